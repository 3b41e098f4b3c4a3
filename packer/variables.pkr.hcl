# Inputs of the appliance image. packer/build-image.sh sets the paths; the rest have
# defaults that suit this project's build machines (no KVM: TCG).

variable "base_disk" {
  type        = string
  description = "The base disk to provision: a file:// URL to the qcow2 packer/base-disk.sh made, or, where there is internet, a Debian 12 cloud image URL (https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2) together with base_disk_checksum; a cloud image needs its own SSH key seeding (cloud-init) instead of this project's seed."
  validation {
    condition     = regex_replace(var.base_disk, "^(file|https)://.+$", "") == ""
    error_message = "The base_disk must be a file:// or https:// URL."
  }
}

variable "base_disk_checksum" {
  type        = string
  description = "Checksum of base_disk, e.g. \"sha256:<hex>\" or \"file:https://.../SHA512SUMS\"; \"none\" only for a local file:// disk the build itself just made."
  default     = "none"
  validation {
    condition     = regex_replace(var.base_disk_checksum, "^(none|(md5|sha1|sha256|sha512):[0-9a-f]+|file:.+)$", "") == ""
    error_message = "The base_disk_checksum must be none, <algorithm>:<hex> or file:<url>."
  }
}

variable "accelerator" {
  type        = string
  description = "QEMU accelerator: tcg (works everywhere, slow), kvm, hvf (macOS) or none."
  default     = "tcg"
  validation {
    condition     = contains(["tcg", "kvm", "hvf", "none"], var.accelerator)
    error_message = "The accelerator must be one of tcg, kvm, hvf, none."
  }
}

variable "cpus" {
  type        = number
  description = "Virtual CPUs of the build VM."
  default     = 2
  validation {
    condition     = var.cpus >= 1 && var.cpus <= 64
    error_message = "The cpus must be between 1 and 64."
  }
}

variable "memory" {
  type        = number
  description = "Memory of the build VM in MiB."
  default     = 1536
  validation {
    condition     = var.memory >= 512
    error_message = "The memory must be at least 512 MiB."
  }
}

variable "ssh_username" {
  type        = string
  description = "The image's operator account, which the build logs in as."
  default     = "admin"
  validation {
    condition     = regex_replace(var.ssh_username, "^[a-z_][a-z0-9_-]{0,31}$", "") == ""
    error_message = "The ssh_username must be a valid Linux user name."
  }
}

variable "ssh_private_key_file" {
  type        = string
  description = "Private half of the per-build SSH key; its public half reaches the guest through QEMU fw_cfg (ssh_public_key_file) and is removed again before the image is saved."
  validation {
    condition     = length(var.ssh_private_key_file) > 0
    error_message = "The ssh_private_key_file must be set (packer/build-image.sh makes one per build)."
  }
}

variable "ssh_public_key_file" {
  type        = string
  description = "Public half of the per-build SSH key, passed to the guest as fw_cfg opt/agent-proxy/authorized_keys."
  validation {
    condition     = regex_replace(var.ssh_public_key_file, "^.+\\.pub$", "") == ""
    error_message = "The ssh_public_key_file must be a .pub file."
  }
}

variable "admin_networks" {
  type        = list(string)
  description = "CIDRs the appliance's firewall lets reach SSH (role firewall's firewall_admin_networks). SSH is key-only; narrow this to your management network."
  default     = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"]
  validation {
    condition     = length(var.admin_networks) > 0
    error_message = "The admin_networks must not be empty: the appliance would be unreachable over SSH."
  }
}

variable "repo_url" {
  type        = string
  description = "Base URL of the build's local apt repository (apt/ under it), served on the host's loopback; 10.0.2.2 is the host as QEMU user networking shows it."
  validation {
    condition     = regex_replace(var.repo_url, "^http://[^/]+/$", "") == ""
    error_message = "The repo_url must look like http://HOST:PORT/ (with the trailing slash)."
  }
}

variable "output_directory" {
  type        = string
  description = "Where Packer writes the provisioned disk (emptied by packer/build-image.sh)."
  default     = "out/build/packer"
}

variable "serial_log" {
  type        = string
  description = "File receiving the build VM's serial console, for diagnosing a build that does not come up."
  default     = "out/build/packer-serial.log"
}
