variable "image" {
  description = "The template image pushed with `make template-push` (DOCKER_USERNAME/exporter-watchdog-runpod:TAG)."
  type        = string
}

variable "cluster_name" {
  description = "Slurm ClusterName and the pods' name prefix."
  type        = string
  default     = "gpu-watchdog"
}

variable "workers" {
  description = "Number of worker pods besides the head."
  type        = number
  default     = 1
}

variable "gpu_type_id" {
  description = "RunPod GPU type of every pod, e.g. \"NVIDIA H100 80GB HBM3\"."
  type        = string
}

variable "gpus_per_pod" {
  type    = number
  default = 1
}

variable "cloud_type" {
  type    = string
  default = "SECURE"
}

variable "container_disk_in_gb" {
  type    = number
  default = 100
}

variable "volume_in_gb" {
  type    = number
  default = 200
}

variable "profile" {
  description = "The exporter-watchdog model profile to serve on idle GPUs (`exporter-watchdog models`)."
  type        = string
  default     = "qwen3-coder-fp8"
}

variable "cooldown_seconds" {
  type    = number
  default = 60
}

variable "munge_key_secret" {
  description = "Name of the RunPod secret holding base64 of >= 32 random bytes (openssl rand -base64 48)."
  type        = string
  default     = "munge_key"
}

variable "api_key_secret" {
  description = "Name of the RunPod secret holding the model server's API key; empty for none."
  type        = string
  default     = ""
}
