output "head_pod_id" {
  value = runpod_pod.head.id
}

output "worker_pod_ids" {
  value = runpod_pod.worker[*].id
}

output "head_internal_name" {
  description = "Where the workers, Prometheus and you reach the head inside the account's network."
  value       = "${runpod_pod.head.id}.runpod.internal"
}
