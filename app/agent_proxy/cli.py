"""The `agent-proxy` command line.

Exit codes: 0 ok; 1 runtime failure; 2 usage or configuration error. Errors are one line
on stderr each; a user mistake never ends in a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from . import __version__, config as configuration
from .config import ConfigError, MIN_SECRET_LENGTH, is_host
from .errors import CommandError, printable
from .hostport import hostport

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
VERSION = f"agent-proxy {__version__}"  # `version` and `--version`


def _fail(message: str, code: int) -> int:
    # One line, whatever a peer (the upstream, a socket error) put into the message.
    print(f"agent-proxy: {printable(message, 2000)}", file=sys.stderr)
    return code


def _load(path: str) -> configuration.Config:
    return configuration.load(path)


# -- init


def _config_text(proxy_id: str, upstream_url: str | None, public_url: str, directory: Path) -> str:
    upstream: dict = {"url": upstream_url}
    if upstream_url and upstream_url.startswith("http:"):
        upstream["allow_insecure"] = True
    data = {
        "proxy_id": proxy_id,
        "public_url": public_url,
        "upstream": upstream,
        "tls": {
            "cert_file": str(directory / "tls" / "proxy.crt"),
            "key_file": str(directory / "tls" / "proxy.key"),
        },
        "shared_secret_file": str(directory / "psk"),
    }
    header = (
        "# agent-proxy configuration, written by `agent-proxy init`.\n"
        "# Every other key has a default; see the README for the full list.\n"
    )
    if upstream_url is None:
        header += "# upstream.url is not set yet: the control plane's URL, e.g. https://8.7.6.5:3302.\n"
    return header + yaml.safe_dump(data, sort_keys=False)


# The config keys init writes from its options: a problem with one names the option.
_INIT_OPTIONS = {"proxy_id": "--proxy-id", "upstream.url": "--upstream-url"}
MAX_DAYS = 3650  # renew-cert --days: ten years


def _read_input(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{option} {path}: cannot read: {exc.strerror}"]) from None


def _given_material(args: argparse.Namespace, hostnames: list[str]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(secret, certificate, key) read from --secret-file, --tls-cert and --tls-key and
    checked; None for what was not given. Raises ConfigError naming the file and the fault."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError(["--tls-cert and --tls-key go together"])
    secret = cert = key = None
    if args.secret_file:
        secret = _read_input("--secret-file", args.secret_file)
        try:
            length = len(secret.decode("utf-8").strip())
        except UnicodeDecodeError:
            raise ConfigError([f"--secret-file {args.secret_file}: not UTF-8 text"]) from None
        if length < MIN_SECRET_LENGTH:
            raise ConfigError([
                f"--secret-file {args.secret_file}: holds {length} characters; at least {MIN_SECRET_LENGTH} are needed"
            ])
    if args.tls_cert:
        from .tlsutil import MaterialError, check_pair

        cert, key = _read_input("--tls-cert", args.tls_cert), _read_input("--tls-key", args.tls_key)
        try:
            # The names are checked only when given: an imported certificate names the
            # site (the balancer), not this host's FQDN.
            check_pair(cert, key, hostnames if args.hostname else [])
        except MaterialError as exc:
            raise ConfigError([f"--tls-cert {args.tls_cert} --tls-key {args.tls_key}: {exc}"]) from None
    return secret, cert, key


def cmd_init(args: argparse.Namespace) -> int:
    # Absolute: the config names its certificate, key and secret by these paths.
    directory = Path(args.config_dir).absolute()
    for hostname in args.hostname or []:
        if not is_host(hostname):
            raise ConfigError([f"--hostname {configuration.shown(hostname)}: not an IP address or a host name "
                               "(ASCII letters, digits, hyphens and dots)"])
    hostnames = args.hostname or [socket.getfqdn()]
    proxy_id = args.proxy_id if args.proxy_id is not None else socket.gethostname().split(".")[0]
    public_url = args.public_url or f"https://{hostport(hostnames[0], 2002)}"
    # public_url's default comes from the first --hostname (or this host's name).
    options = {**_INIT_OPTIONS, "public_url": "--public-url" if args.public_url else "--hostname (public_url's default)"}
    files = {
        "config": directory / "agent-proxy.yaml",
        "cert": directory / "tls" / "proxy.crt",
        "key": directory / "tls" / "proxy.key",
        "secret": directory / "psk",
    }
    existing = [str(p) for p in files.values() if p.exists()]
    if existing:
        return _fail(f"refusing to overwrite {', '.join(existing)} (nothing was changed)", EXIT_FAILURE)
    # Validate exactly what we are about to write before touching the disk.
    text = _config_text(proxy_id, args.upstream_url, public_url, directory)
    checked = yaml.safe_load(text)
    if args.upstream_url is None:  # the rest is checked; the URL is the operator's to add
        checked["upstream"]["url"] = "https://upstream.invalid"
    try:
        configuration.parse(checked, "init", environ={})
    except ConfigError as exc:
        for problem in exc.problems:
            key, _, reason = problem.removeprefix("init: ").partition(": ")
            print(f"agent-proxy: {options.get(key, key)}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    if public_url.startswith("http:"):
        print("agent-proxy: warning: public_url is plain http; the upstream will reach this proxy without TLS",
              file=sys.stderr)
    if args.upstream_url is None:
        print(f"agent-proxy: warning: no --upstream-url: set upstream.url in {files['config']} before serving "
              "(check-config fails until then)", file=sys.stderr)
    elif args.upstream_url.startswith("http:"):
        print("agent-proxy: warning: --upstream-url is plain http; wrote upstream.allow_insecure: true "
              "(agents' calls reach the upstream unencrypted)", file=sys.stderr)
    secret, cert_pem, key_pem = _given_material(args, hostnames)

    from .tlsutil import cert_names, fingerprint, load_cert, names_host, self_signed

    # The upstream calls public_url back and verifies the certificate against its host.
    public_host = urlsplit(public_url).hostname
    if cert_pem is None:
        wanted = hostnames + ([public_host] if not names_host(hostnames, public_host) else [])
        cert_pem, key_pem = self_signed(hostnames[0], wanted)
    names = cert_names(load_cert(cert_pem))
    if not names_host(names, public_host):   # only a given certificate can lack it
        print(f"agent-proxy: warning: --tls-cert {args.tls_cert} does not name {public_host}, the host of public_url: "
              "the upstream's handshake with this proxy will fail to verify it", file=sys.stderr)
    generated_secret = secret is None
    if generated_secret:
        secret = (secrets.token_hex(32) + "\n").encode()
    written: list[Path] = []
    try:
        (directory / "tls").mkdir(parents=True, exist_ok=True)
        for path, content, mode in (
            (files["key"], key_pem, 0o600),
            (files["secret"], secret, 0o600),
            (files["cert"], cert_pem, 0o644),
            (files["config"], text.encode(), 0o640),
        ):
            # O_EXCL: never replace a file that appeared since the check above.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.chmod(path, mode)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        return _fail(f"cannot write {exc.filename}: {exc.strerror} (nothing was changed)", EXIT_FAILURE)

    print(f"wrote {files['config']}, {files['cert']}, {files['key']} (0600), {files['secret']} (0600)")
    print()
    print(f"Hand these to the upstream for proxy_id {proxy_id}:")
    # A secret that was given is already known to whoever gave it: it is not repeated.
    print(f"shared secret: {secret.decode().strip()}" if generated_secret else f"shared secret: the one in {args.secret_file}")
    print(f"certificate SHA-256 fingerprint: {fingerprint(cert_pem)} (names: {', '.join(names)})")
    print(cert_pem.decode().rstrip())
    return EXIT_OK


def cmd_renew_cert(args: argparse.Namespace) -> int:
    """A new self-signed certificate for the configured key and the old certificate's names."""
    from cryptography.x509.oid import NameOID

    from . import files
    from .tlsutil import MaterialError, cert_names, fingerprint, load_cert, load_key, same_key, self_signed

    if not 1 <= args.days <= MAX_DAYS:
        raise ConfigError([f"--days {args.days}: expected a number of days, 1 to {MAX_DAYS}"])
    tls = _load(args.config).tls
    cert_pem = _read_input("tls.cert_file", tls.cert_file)
    key_pem = _read_input("tls.key_file", tls.key_file)
    try:
        old = load_cert(cert_pem)
        if not same_key(old, load_key(key_pem)):
            raise MaterialError("the key is not the certificate's (renew-cert keeps the key; for a new one, "
                                "move both away and run init)")
        common_names = [str(a.value) for a in old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        # A certificate without subjectAltName names its host in the common name only.
        names = cert_names(old) or common_names
        if not names:
            raise MaterialError("it names no host")
        new_pem, _ = self_signed((common_names or names)[0], names, days=args.days, key_pem=key_pem)
    except MaterialError as exc:
        raise ConfigError([f"{tls.cert_file} with {tls.key_file}: cannot renew: {exc}"]) from None
    cert_path = Path(tls.cert_file)
    try:
        files.replace(cert_path, new_pem, *files.keep_owner_and_mode(cert_path, 0o644))
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or cert_path}: {exc.strerror} (nothing was changed)") from None
    print(f"wrote {cert_path} for {', '.join(names)}, valid {args.days} days; reload the front to serve it")
    print(f"certificate SHA-256 fingerprint: {fingerprint(new_pem)}")
    return EXIT_OK


# -- check-config, serve, render, register


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    config.read_secret()
    if problems := configuration.tls_file_problems(config):
        raise ConfigError([f"{config.source}: {problem}" for problem in problems])
    for warning in configuration.warnings(config):
        print(f"agent-proxy: warning: {config.source}: {warning}", file=sys.stderr)
    print(f"{config.source}: ok (proxy_id {config.proxy_id})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError([f"--port {args.port}: expected a TCP port, 1-65535"])
    return serve(args.config, port=args.port)


def _variables(args: argparse.Namespace) -> dict:
    from .render import read_variables

    variables: dict = {}
    for path in args.vars or []:
        variables.update(read_variables(path))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key=value"])
        try:
            variables[key] = configuration.load_yaml(value)
        except yaml.YAMLError:
            raise ConfigError([f"--set {item!r}: cannot parse the value"]) from None
    return variables


def cmd_render(args: argparse.Namespace) -> int:
    import jinja2

    from .render import MissingVariables, render

    config = _load(args.config)
    variables = _variables(args)
    try:
        sys.stdout.write(render(args.template, config, variables))
    except MissingVariables as exc:
        them = "it" if len(exc.names) == 1 else "them"
        return _fail(f"render {args.template}: {exc} (pass {them} with --set or --vars)", EXIT_USAGE)
    except jinja2.UndefinedError as exc:
        return _fail(f"render {args.template}: {exc.message}", EXIT_USAGE)
    except (TypeError, ValueError, AttributeError, jinja2.TemplateError) as exc:
        if not variables:
            raise  # the template's own fault, not the user's: a traceback is the report
        # A variable of the wrong shape (--set nodes=5 where a list of nodes is due).
        return _fail(f"render {args.template}: a variable from --set or --vars has the wrong type or shape "
                     f"({exc}); the template's header says what each one takes", EXIT_USAGE)
    return EXIT_OK


def _wait_seconds(text: str | None) -> float | None:
    """--wait-front's value: a number of seconds, 0 or more; None when not given."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError([f"--wait-front {text!r}: expected a number of seconds, 0 or more"])
    return seconds


def cmd_register(args: argparse.Namespace) -> int:
    from . import registration
    from .status import record_registration

    wait_front = _wait_seconds(args.wait_front)
    # A failed feature does not stop registration (the upstream hears about it), unless
    # it is the way to the upstream itself.
    config = configuration.load(args.config, lenient=True)
    if "northbound" in config.failed_features:
        raise ConfigError([f"{config.source}: {config.failed_features['northbound']}"])
    action = registration.register if args.command == "register" else registration.deregister
    try:
        if wait_front is not None:
            registration.wait_for_front(config, wait_front)
        line = action(config)
    except CommandError as exc:
        record_registration(f"{args.command} FAILED: {exc}")
        raise
    record_registration(line)
    print(line)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from . import status

    rows, serving = status.collect(args.config)
    sys.stdout.write(status.as_json(rows, serving) if args.json else status.text(rows, serving))
    return EXIT_OK if serving else EXIT_FAILURE


def cmd_apply(args: argparse.Namespace) -> int:
    from .apply import apply

    for line in apply(args.config, args.firewall_dir, args.front_config, reload=not args.no_reload,
                      front_vars=args.front_vars):
        print(line)
    return EXIT_OK


def cmd_lb(args: argparse.Namespace) -> int:
    from . import lbctl

    if not (math.isfinite(args.timeout) and args.timeout >= 0):
        raise ConfigError([f"--timeout {args.timeout:g}: expected a number of seconds, 0 or more"])
    if args.socket:
        sock = lbctl.StatsSocket(args.socket, "--socket")
    else:
        # lenient: the socket is all `lb` reads; a feature's unreadable CA file must not stop a drain.
        config = configuration.load(args.config, lenient=True)
        sock = lbctl.StatsSocket(config.front.stats_socket, f"front.stats_socket in {config.source}")
    try:
        backends = args.backend or sock.backends_with(args.server)
        if args.action == "status":
            states = sock.states(backends, args.server)
        elif args.action == "drain":
            states = lbctl.drain(sock, backends, args.server)
        elif args.action == "ready":
            states = lbctl.ready(sock, backends, args.server, args.timeout)
        else:
            states = lbctl.wait_idle(sock, backends, args.server, args.timeout)
    except lbctl.UnknownServer as exc:
        return _fail(f"lb {args.action}: {exc}", EXIT_USAGE)
    except lbctl.LbError as exc:
        return _fail(f"lb {args.action}: {exc}", EXIT_FAILURE)
    for state in states:
        print(state.line())
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(VERSION)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-proxy", description="A stateless, signing agent proxy.")
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", default=configuration.DEFAULT_PATH, help="configuration file (default: %(default)s)")
        return p

    p = sub.add_parser("init", help="write a config, a certificate and a shared secret (made, or the given ones)")
    p.add_argument("--config-dir", default=str(Path(configuration.DEFAULT_PATH).parent))
    p.add_argument("--proxy-id", help="default: the short host name")
    p.add_argument("--upstream-url", help="the control plane, e.g. https://8.7.6.5:3302 (without it, upstream.url "
                                          "is left for you to set in the config)")
    p.add_argument("--public-url", help="where the upstream reaches this proxy (default: https://HOSTNAME:2002)")
    p.add_argument("--hostname", action="extend", nargs="+", metavar="H",
                   help="names or IPs for the certificate (one or more, repeatable); with --tls-cert: each must be in it")
    p.add_argument("--secret-file", metavar="FILE", help="install this shared secret (32+ characters) instead of making one")
    p.add_argument("--tls-cert", metavar="FILE", help="install this certificate (PEM, with --tls-key) instead of making one")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM, unencrypted)")
    p.set_defaults(func=cmd_init)

    p = with_config(sub.add_parser("renew-cert", help="a new self-signed certificate for the same key and names"))
    p.add_argument("--days", type=int, default=825, help="validity in days (default: %(default)s)")
    p.set_defaults(func=cmd_renew_cert)

    p = with_config(sub.add_parser("check-config", help="validate a configuration file"))
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("serve", help="run one worker"))
    p.add_argument("--port", type=int, help="override listen.port")
    p.set_defaults(func=cmd_serve)

    from .render import TEMPLATES

    p = with_config(sub.add_parser("render", help="print a rendered template"))
    p.add_argument("template", choices=sorted(TEMPLATES))
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a template variable (YAML value)")
    p.add_argument("--vars", action="append", metavar="FILE", help="a YAML file of template variables")
    p.set_defaults(func=cmd_render)

    p = with_config(sub.add_parser("register", help="register this proxy with the upstream"))
    p.add_argument("--wait-front", metavar="SECONDS",
                   help="first wait up to SECONDS until the node front answers /_proxy/health (default: no wait)")
    p.set_defaults(func=cmd_register)
    p = with_config(sub.add_parser("deregister", help="remove this proxy from the upstream"))
    p.set_defaults(func=cmd_register, wait_front=None)

    p = with_config(sub.add_parser("status", help="this node: identity, upstream readiness, certificate, services"))
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_status)

    from .apply import FIREWALL_DIR, FRONT_CONFIG, FRONT_VARS

    p = with_config(sub.add_parser(
        "apply", help="check an edited config, render and test firewall, front and its signing key, then reload them and the workers"))
    p.add_argument("--firewall-dir", default=FIREWALL_DIR, help="rules.v4, rules.v6 and vars.yaml (default: %(default)s)")
    p.add_argument("--front-config", default=FRONT_CONFIG, help="the node front's HAProxy file (default: %(default)s)")
    p.add_argument("--front-vars", default=FRONT_VARS,
                   help="the front's template variables, used when the file exists (default: %(default)s)")
    p.add_argument("--no-reload", action="store_true", help="install the checked files but reload nothing")
    p.set_defaults(func=cmd_apply)

    p = with_config(sub.add_parser(
        "lb", help="drain a server on a balancer or a node front, wait until idle, put it back (HAProxy stats socket)"))
    p.add_argument("action", choices=["drain", "ready", "wait-idle", "status"],
                   help="drain: no new connections; wait-idle: until it carries none; ready: back in, waits until UP")
    p.add_argument("--socket", help="HAProxy stats socket, level admin (default: the config's front.stats_socket)")
    p.add_argument("--backend", action="append",
                   help="a backend, may be repeated (default: every backend with a server of that name)")
    p.add_argument("--server", required=True, help="server name, e.g. node1")
    p.add_argument("--timeout", type=float, default=60, help="seconds wait-idle and ready wait (default: %(default)s)")
    p.set_defaults(func=cmd_lb)

    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"agent-proxy: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`agent-proxy render ... | head`): nothing more to say, and
        # Python's flush at exit must not fail on the closed pipe either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
