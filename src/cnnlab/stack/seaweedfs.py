"""SeaweedFS: the S3 artifact store, with mutual TLS and JWTs between its parts."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from cnnlab.stack.secrets import make_tls, write_private
from cnnlab.stack.supervisor import Daemon, HOST, console_script, reserve_ports, saved_ports, wait_for

def ensure_bucket(s3, bucket: str, timeout: float = 60, log: Path | None = None) -> None:
    """Create `bucket` with boto3 client `s3` unless it exists, then wait until a write to it succeeds."""
    def writable() -> bool:
        try:
            if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=".cnnlab-health", Body=b"ok")
            return True
        except Exception:  # noqa: BLE001 - not up yet: any client or server error means try again
            return False
    wait_for(writable, f"S3 bucket {bucket!r} at {s3.meta.endpoint_url}", timeout, log=log)


def weed_security(tls: Path, keys: dict[str, str]) -> str:
    """security.toml: JWT-signed writes to volumes and reads/writes to the filer, mutual TLS on every internal
    port (HTTP and gRPC) of master, volume and filer, no UIs. Only the S3 gateway (its own keys) serves clients."""
    files = f'cert = "{tls}/tls.crt"\nkey = "{tls}/tls.key"\n'
    return "\n".join([
        f'[jwt.signing]\nkey = "{keys["volume"]}"\n', f'[jwt.filer_signing]\nkey = "{keys["filer"]}"\n',
        f'[jwt.filer_signing.read]\nkey = "{keys["filer_read"]}"\n', "[access]\nui = false\n",
        "[filer.expose_directory_metadata]\nenabled = false\n", f'[grpc]\nca = "{tls}/ca.crt"\n',
        *(f"[grpc.{part}]\n{files}" for part in ("master", "volume", "filer", "s3", "client")),
        *(f'[https.{part}]\n{files}ca = "{tls}/ca.crt"\n' for part in ("master", "volume", "filer")),
        f'[https.client]\nenabled = true\n{files}ca = "{tls}/ca.crt"\n'])


class SeaweedFS(Daemon):
    """`weed server`: master, volume, filer and S3 on loopback; S3 needs its key, the rest a client certificate."""

    name = "seaweedfs"
    PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
    INTERNAL = PORTS[2:]

    def __init__(self, root: Path | str, port: int = 0):
        super().__init__(root)
        self.wanted = {"s3": port}
        self.ports = saved_ports(self.root / "ports.json")
        self.config = self.root / "s3.json"
        self.security = self.root / "security.toml"  # weed reads ./security.toml: it runs in root
        self.tls = self.root / "tls"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.get('s3', 0)}"

    def credentials(self) -> dict[str, str]:
        """The one S3 identity (created with a random secret on first use); the MLflow server and admins use it."""
        if not self.config.exists():
            identity = {"name": "cnnlab", "credentials": [{"accessKey": "cnnlab", "secretKey": secrets.token_hex(16)}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            write_private(self.config, json.dumps({"identities": [identity]}))
        cred = json.loads(self.config.read_text())["identities"][0]["credentials"][0]
        return {"AWS_ACCESS_KEY_ID": cred["accessKey"], "AWS_SECRET_ACCESS_KEY": cred["secretKey"],
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def rotate_credentials(self) -> None:
        """A new S3 secret key (takes effect at the next start)."""
        self.config.unlink(missing_ok=True)
        self.credentials()

    def _secure(self) -> None:
        """security.toml and the TLS files, generated once."""
        if not (self.tls / "tls.crt").exists():
            make_tls(self.tls)
        if not self.security.exists():
            keys = {k: secrets.token_hex(32) for k in ("volume", "filer", "filer_read")}
            write_private(self.security, weed_security(self.tls, keys))

    def client(self):
        import boto3
        from botocore.config import Config

        cred = self.credentials()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=cred["AWS_DEFAULT_REGION"],
                            aws_access_key_id=cred["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=cred["AWS_SECRET_ACCESS_KEY"],
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def argv(self) -> list[str]:
        p = self.ports
        return [console_script("weed"), "server", f"-dir={self.root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
                # one node: no raft state to resume, elect at once; small volumes, few of them
                "-master.resumeState=false", "-master.electionTimeout=1s", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=1024", "-volume.max=16"]

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}  # none overrides security.toml

    def pid(self) -> int | None:
        if not self.ports.get("s3"):
            return None
        return super().pid()

    def start(self, timeout: float = 90) -> "SeaweedFS":
        if not self.running():
            self.ports = reserve_ports(self.root / "ports.json", {k: self.wanted.get(k, 0) for k in self.PORTS})
            (self.root / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
            self.credentials()
            self._secure()
        super().start(timeout)
        return self

    def healthy(self) -> bool:
        """S3 answers an authenticated request (the volume server may still be joining: see ensure_bucket)."""
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def ensure_bucket(self, bucket: str, timeout: float = 60) -> None:
        ensure_bucket(self.client(), bucket, timeout, self.log)

    def grpc_sockets(self) -> list[Path]:
        """weed's unix sockets for its own gRPC calls: fixed in /tmp (no flag moves them), made 0700 by the umask."""
        return [Path(f"/tmp/seaweedfs-{key.split('_')[0]}-grpc-{self.ports.get(key)}.sock")
                for key in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc")]

    def stop(self, grace: float = 3) -> None:
        """weed's graceful shutdown can hang on a lone node; its stores survive a kill (journaled)."""
        super().stop(grace)
        for sock in self.grpc_sockets():  # weed leaves these behind
            sock.unlink(missing_ok=True)
