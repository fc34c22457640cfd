"""The Cloudflare tunnel connector: its command line and ingress (launch), and its supervision (connector)."""
