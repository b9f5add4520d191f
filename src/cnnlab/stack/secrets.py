"""Secrets: generated, kept in files that are 0600 from creation, handed over by file, never on a command line."""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from cnnlab.stack.supervisor import HOST, write_private

CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def new_password() -> str:
    return secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]: safe in URLs, pgpass and env files


def private_value(path: Path) -> str:
    """The secret kept in `path`, generated on first use."""
    if not path.exists():
        write_private(path, new_password() + "\n")
    return path.read_text().strip()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the credentials files `cnnlab stack user` writes)."""
    lines = [line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in lines}


def write_credentials(path: Path, username: str, password: str) -> Path:
    return write_private(path, f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n")


def write_worker_credentials(path: Path, username: str, password: str, urls: dict[str, str],
                             optuna_password: str) -> Path:
    """A tuning worker's files, as another host gets them: MLflow's credentials, the server and the Optuna storage
    (URLs of this host: reach them through a tunnel on the same ports, or TLS) in `path`, and the storage's password
    in a PostgreSQL password file beside it (PGPASSFILE, relative to `path`)."""
    pgpass = write_pgpass(path.with_suffix(".pgpass"), "optuna", ("optuna",), optuna_password)
    return write_private(path, f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n"
                               f"MLFLOW_TRACKING_URI={urls['tracking_uri']}\nCNNLAB_OPTUNA_STORAGE="
                               f"{urls['optuna_storage']}\nPGPASSFILE={pgpass.name}\n")


def worker_environment(path: Path) -> dict[str, str]:
    """The environment a credentials file gives a tuning worker (`cnnlab tune --credentials`), its PGPASSFILE
    resolved beside it."""
    env = read_env_file(path)
    if "PGPASSFILE" in env:
        env["PGPASSFILE"] = str((path.parent / env["PGPASSFILE"]).resolve())
    return env


def pgpass_password(path: Path, role: str) -> str | None:
    """The password of `role` in a PostgreSQL password file (lines host:port:database:user:password)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == role:
            return fields[4]
    return None


def write_pgpass(path: Path, role: str, databases: tuple[str, ...], password: str) -> Path:
    """A password file for `role` on any host and port (a tunnel's port too), read by libpq via PGPASSFILE."""
    return write_private(path, "".join(f"*:*:{db}:{role}:{password}\n" for db in databases))


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier, computed here so the clear password never reaches the server or its log."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def make_tls(folder: Path) -> None:
    """A private CA and one certificate (client and server) for every SeaweedFS component; weed checks no host names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, *extensions):
        builder = (x509.CertificateBuilder().public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    write_private(folder / "tls.key", pem)
    write_private(folder / "ca.crt", cert("cnnlab-ca", ca_key, "cnnlab-ca", ca_key,
                                          (x509.BasicConstraints(ca=True, path_length=0), True)))
    write_private(folder / "tls.crt", cert("seaweedfs", key, "cnnlab-ca", ca_key, (usage, False), (names, False)))


@contextlib.contextmanager
def credentials(path: Path):
    """MLflow's client credentials from a `cnnlab stack user` file, for the duration of the block."""
    saved = {k: os.environ.get(k) for k in CREDENTIAL_KEYS}
    os.environ.update({k: v for k, v in read_env_file(path).items() if k in CREDENTIAL_KEYS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
