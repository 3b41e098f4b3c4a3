# Provisioning: the guest's apt sees only the build's local repository; the appliance
# playbook runs twice (the second run must change nothing); then everything specific to
# this build (its SSH key, host keys, machine id, apt lists, logs) is removed.
build {
  sources = ["source.qemu.appliance"]

  provisioner "shell" {
    execute_command = "sudo sh -eu '{{ .Path }}'"
    inline = [
      "mv /etc/apt/sources.list /etc/apt/sources.list.debian",
      "echo 'deb [trusted=yes] ${var.repo_url}apt/ ./' > /etc/apt/sources.list.d/build-local.list",
      "apt-get update -qq",
    ]
  }

  # Console banner, login message, journal limits: image-only, so they are not part of
  # the package or the roles (first boot and registration at boot come with the package;
  # the image enables them).
  provisioner "file" {
    sources = [
      "appliance/console/agent-proxy-issue", "appliance/console/agent-proxy-issue.service",
      "appliance/console/agent-proxy-issue.timer", "appliance/console/50-agent-proxy", "appliance/motd",
      "appliance/journald/60-agent-proxy.conf",
    ]
    destination = "/tmp/"
  }

  provisioner "shell" {
    execute_command = "sudo sh -eu '{{ .Path }}'"
    inline = [
      "install -m 0755 /tmp/agent-proxy-issue /usr/local/sbin/",
      "install -m 0644 /tmp/agent-proxy-issue.service /tmp/agent-proxy-issue.timer /etc/systemd/system/",
      "install -m 0644 /tmp/motd /etc/motd",
      "install -m 0755 /tmp/50-agent-proxy /etc/update-motd.d/",
      "install -D -m 0644 /tmp/60-agent-proxy.conf /etc/systemd/journald.conf.d/60-agent-proxy.conf",
      "systemctl enable --quiet agent-proxy-issue.service agent-proxy-issue.timer",
    ]
  }

  provisioner "shell-local" {
    inline = ["packer/run-playbook.sh first"]
    environment_vars = [
      "PLAYBOOK_HOST=${build.Host}",
      "PLAYBOOK_PORT=${build.Port}",
      "PLAYBOOK_USER=${build.User}",
      "PLAYBOOK_KEY=${var.ssh_private_key_file}",
      "PLAYBOOK_ADMIN_NETWORKS=${join(",", var.admin_networks)}",
    ]
  }

  provisioner "shell-local" {
    inline = ["packer/run-playbook.sh second"]
    environment_vars = [
      "PLAYBOOK_HOST=${build.Host}",
      "PLAYBOOK_PORT=${build.Port}",
      "PLAYBOOK_USER=${build.User}",
      "PLAYBOOK_KEY=${var.ssh_private_key_file}",
      "PLAYBOOK_ADMIN_NETWORKS=${join(",", var.admin_networks)}",
    ]
  }

  provisioner "shell" {
    execute_command = "sudo sh -eu '{{ .Path }}'"
    inline = [
      # First boot (from the package, which the playbook installed) runs on every copy's first boot.
      "systemctl enable --quiet agent-proxy-firstboot.service agent-proxy-register.service",
      # The operator reads the config (no secret in it) for `agent-proxy status` without sudo.
      "usermod -a -G agent-proxy ${var.ssh_username}",
      "rm -f /etc/apt/sources.list.d/build-local.list",
      "mv /etc/apt/sources.list.debian /etc/apt/sources.list",
      "apt-get clean",
      "rm -rf /var/lib/apt/lists/* /tmp/* /var/tmp/*",
      "rm -f /etc/ssh/ssh_host_* /home/${var.ssh_username}/.ssh/authorized_keys",
      # Ansible's folders from the playbook's runs (remote temp files, Mitogen's).
      "rm -rf /root/.ansible /home/${var.ssh_username}/.ansible",
      "truncate -s 0 /etc/machine-id",
      "journalctl --rotate --vacuum-time=1s --quiet",
      "rm -rf /var/log/journal/*",
      "fstrim -v /",
    ]
  }
}
