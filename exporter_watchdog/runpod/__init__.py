"""The RunPod pod template: settings from the environment, rendered configs, the `pod` command."""
