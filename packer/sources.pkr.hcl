# The build VM: QEMU booting a copy of the base disk. User networking only, with the SSH
# forward bound to loopback; the guest reaches the build's repositories on 10.0.2.2.
source "qemu" "appliance" {
  disk_image       = true
  iso_url          = var.base_disk
  iso_checksum     = var.base_disk_checksum
  use_backing_file = false
  skip_resize_disk = true
  format           = "qcow2"
  disk_interface   = "virtio"
  disk_compression = true
  net_device       = "virtio-net"
  output_directory = var.output_directory
  vm_name          = "agent-proxy.qcow2"

  accelerator      = var.accelerator
  cpus             = var.cpus
  memory           = var.memory
  headless         = true
  vnc_bind_address = "127.0.0.1"
  boot_wait        = "1s"
  qemuargs = [
    ["-cpu", "max"],
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-fw_cfg", "name=opt/agent-proxy/authorized_keys,file=${var.ssh_public_key_file}"],
    ["-serial", "file:${var.serial_log}"],
  ]

  communicator         = "ssh"
  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "5m"
  shutdown_command     = "sudo systemctl poweroff"
  shutdown_timeout     = "2m"
}
