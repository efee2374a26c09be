"""A private software TPM (swtpm) for tests and the demo: free ports, own state directory, readiness
check, teardown.

``Swtpm(state_dir)`` runs ``swtpm socket --tpm2 --tpmstate dir=<state_dir> --server type=tcp,port=P
--ctrl type=tcp,port=P+1 --flags not-need-init,startup-clear`` on 127.0.0.1 and waits until a
TPM2_GetRandom answers; ``tcti`` is the tpm2-pytss TCTI string for it. ``ek_cert=True`` first provisions the
state with ``swtpm_setup --create-ek-cert`` against a throw-away local CA (about a second). A missing
``swtpm`` binary raises :class:`tmb.errors.TpmError` naming the Debian package.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from probes.tpm import TpmClient
from tmb.errors import TpmError

READY_TIMEOUT_S = 10.0


def _free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 (server and ctrl channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no pair of free TCP ports on 127.0.0.1")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise TpmError(
            f"{binary} is not installed",
            hint="Debian: apt-get install swtpm swtpm-tools (make demo and make test install them)",
        )
    return path


def provision_ek_cert(state_dir: Path) -> None:
    """``swtpm_setup --tpm2 --create-ek-cert`` with a private local CA (sha1+sha256 PCR banks active)."""
    ca = state_dir.parent / (state_dir.name + "-ca")
    ca.mkdir(parents=True, exist_ok=True)
    (ca / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (ca / "setup.conf").write_text(
        f"create_certs_tool = {_require('swtpm_localca')}\ncreate_certs_tool_config = {ca}/localca.conf\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\n"
    )
    cmd = [_require("swtpm_setup"), "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert"]
    cmd += ["--config", str(ca / "setup.conf"), "--pcr-banks", "sha1,sha256", "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed ({done.returncode}): {done.stdout}{done.stderr}")


class Swtpm:
    """One swtpm process on free ports with a private state directory."""

    def __init__(self, state_dir: Path, *, ek_cert: bool = False) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.binary = _require("swtpm")
        if ek_cert:
            provision_ek_cert(state_dir)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / (state_dir.name + ".log")
        self.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    def client(self) -> TpmClient:
        return TpmClient(self.tcti)

    def start(self) -> None:
        self.port = _free_port_pair()
        cmd = [self.binary, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}"]
        cmd += ["--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1"]
        cmd += ["--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1"]
        cmd += ["--flags", "not-need-init,startup-clear", "--log", f"file={self.log},level=1"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"swtpm exited with {self.proc.returncode} on port {self.port}: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                with self.client() as tpm:
                    if len(tpm.get_random(8)) == 8:
                        return
            except (OSError, TpmError) as exc:
                last = exc
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"swtpm on port {self.port} not ready after {READY_TIMEOUT_S} s: {last}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()

    def reboot(self, *, orderly: bool = True) -> None:
        """Power-cycle: TPM2_Shutdown(CLEAR) when ``orderly``, stop, start (Startup(CLEAR)): resetCount+1."""
        if orderly:
            with self.client() as tpm:
                tpm.shutdown("clear")
        self.stop()
        self.start()

    def hibernate_resume(self) -> None:
        """TPM2_Shutdown(STATE), stop, start: a TPM Restart (restartCount+1, resetCount unchanged)."""
        with self.client() as tpm:
            tpm.shutdown("state")
        self.stop()
        self.start()
