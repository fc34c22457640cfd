# A head pod and N worker pods of the exporter-watchdog RunPod template.
# Written for the runpod/runpod provider 1.x; see ../README.md ("Terraform") for what was checked.
terraform {
  required_providers {
    runpod = {
      source  = "runpod/runpod"
      version = "~> 1.0"
    }
  }
}

# The API key comes from RUNPOD_API_KEY in the environment, never from this file.
provider "runpod" {}

locals {
  # Secrets are RunPod secrets referenced by name: their values never enter Terraform's state.
  common_env = {
    CLUSTER_NAME        = var.cluster_name
    MUNGE_KEY           = "{{ RUNPOD_SECRET_${var.munge_key_secret} }}"
    EW_PROFILE          = var.profile
    EW_COOLDOWN_SECONDS = tostring(var.cooldown_seconds)
  }
  api_key_env = var.api_key_secret == "" ? {} : { EW_API_KEY = "{{ RUNPOD_SECRET_${var.api_key_secret} }}" }
  ports       = "9400/tcp,9341/tcp,6817/tcp,6818/tcp,8000/http"
}

resource "runpod_pod" "head" {
  name                 = "${var.cluster_name}-head"
  image_name           = var.image
  gpu_type_id          = var.gpu_type_id
  gpu_count            = var.gpus_per_pod
  cloud_type           = var.cloud_type
  container_disk_in_gb = var.container_disk_in_gb
  volume_in_gb         = var.volume_in_gb
  volume_mount_path    = "/workspace"
  ports                = local.ports
  # Enable global networking for every pod (the pods reach each other as <POD_ID>.runpod.internal).
  env = merge(local.common_env, local.api_key_env, { NODE_ROLE = "head" })
}

resource "runpod_pod" "worker" {
  count                = var.workers
  name                 = "${var.cluster_name}-worker-${count.index + 1}"
  image_name           = var.image
  gpu_type_id          = var.gpu_type_id
  gpu_count            = var.gpus_per_pod
  cloud_type           = var.cloud_type
  container_disk_in_gb = var.container_disk_in_gb
  volume_in_gb         = var.volume_in_gb
  volume_mount_path    = "/workspace"
  ports                = local.ports
  env = merge(local.common_env, local.api_key_env, {
    NODE_ROLE      = "worker"
    HEAD_NODE_HOST = "${runpod_pod.head.id}.runpod.internal"
  })
}
