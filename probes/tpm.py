"""The probe's TPM client (tpm2-pytss ESAPI over a TCTI).

TCTI strings: ``device:/dev/tpmrm0`` in production (the kernel resource manager), ``swtpm:host=H,port=P`` for
swtpm in tests and the demo. Every TPM failure becomes a :class:`~tmb.errors.TpmError` naming the operation,
the TPM response code and the TCTI.

Keys (all with empty authorisation, as usual for attestation keys):

* **AK**: a restricted signing key (RSA-2048 RSASSA-SHA256 or ECC P-256 ECDSA-SHA256; fixedTPM, fixedParent,
  sensitiveDataOrigin, userWithAuth) created under the RSA EK (as ``tpm2_createak`` and keylime do, through a
  PolicySecret(endorsement) session) and made persistent at :data:`AK_HANDLE` (``0x81010002``) by default.
  Being in the endorsement hierarchy, its quotes carry resetCount/restartCount/firmwareVersion in clear (keys
  of the owner hierarchy get them obfuscated by a per-key offset). :meth:`TpmClient.create_or_load_ak` reuses
  the key already at the handle.
* **EK**: the TCG default EK (``EK-RSA2048``, ``EK-ECC256`` or ``EK-HIGH-ECC384`` template, or the template
  stored in NV), recreated on demand from the endorsement seed; its certificate is read from NV
  ``0x01c00002`` (RSA), ``0x01c0000a`` (ECC P-256) or ``0x01c00016`` (ECC P-384, which
  ``swtpm_setup --create-ek-cert`` writes besides the RSA one).

Node identity (docs/probe.md, "Node identity"): the probe sends :meth:`TpmClient.ek_public` and
:meth:`TpmClient.ek_certificates` with the AK's public area; the daemon checks them
(:mod:`tmb.attest.ekcert`, :mod:`tmb.attest.akcheck`) and answers with a credential made for the AK's name
(:mod:`tmb.attest.credential`), which only this TPM can open: :meth:`TpmClient.activate_credential`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_SE, TPM2_SU, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2_HANDLE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from tmb.attest import tpm2
from tmb.attest.quote import AkPublic, load_ak
from tmb.attest.tpm2 import PcrValues
from tmb.errors import TpmError

__all__ = ["AK_HANDLE", "EK_CERT_NV_INDEX", "Quote", "TpmClient"]

AK_HANDLE = 0x81010002
EK_CERT_NV_INDEX = {"rsa": 0x01C00002, "ecc": 0x01C0000A, "ecc384": 0x01C00016}
_EK_TYPES = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256", "ecc384": "EK-HIGH-ECC384"}
_PERSISTENT_FIRST = 0x81000000
_NV_FIRST = 0x01000000
_AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
_AK_TEMPLATES = {"rsa": "rsa2048:rsassa-{h}:null", "ecc": "ecc256:ecdsa-{h}:null"}
_MAX_QUOTE_TRIES = 3


@dataclass(frozen=True)
class Quote:
    """A quote as the TPM returned it: the signed ``TPMS_ATTEST`` bytes, the ``TPMT_SIGNATURE`` bytes, and the
    values of the quoted PCRs (read so that they hash to the quoted pcrDigest)."""

    message: bytes
    signature: bytes
    pcrs: PcrValues


class TpmClient:
    """A connection to one TPM. Use as a context manager: ``with TpmClient(tcti) as tpm: ...``."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._ctx = ESAPI(TCTILdr.parse(tcti))
        except (TSS2_Exception, ValueError, RuntimeError) as exc:
            raise TpmError(
                f"cannot open the TPM: {exc}",
                tcti=tcti,
                hint="is swtpm running on that port, or is /dev/tpmrm0 readable by this user?",
            ) from None

    def __enter__(self) -> TpmClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.close()

    @contextmanager
    def _op(self, what: str, **context: Any) -> Iterator[Any]:
        if self._ctx is None:
            raise TpmError(f"TPM {what}: the client is closed", tcti=self.tcti)
        try:
            yield self._ctx
        except TSS2_Exception as exc:
            raise TpmError(
                f"TPM {what} failed: {exc}", rc=f"0x{int(exc.rc):x}", tcti=self.tcti, **context
            ) from None

    # ----------------------------------------------------------------------------------------- basics

    def get_random(self, n: int) -> bytes:
        """``n`` random bytes from the TPM (asked in chunks of at most 32)."""
        out = b""
        with self._op("GetRandom", bytes=n) as ctx:
            while len(out) < n:
                out += bytes(ctx.get_random(min(32, n - len(out))))
        return out

    def shutdown(self, kind: str = "clear") -> None:
        """TPM2_Shutdown(CLEAR) before a power-off, or (``kind="state"``) before hibernation."""
        su = {"clear": TPM2_SU.CLEAR, "state": TPM2_SU.STATE}.get(kind)
        if su is None:
            raise TpmError(f"unknown shutdown type {kind!r}", hint="use 'clear' or 'state'")
        with self._op("Shutdown", kind=kind) as ctx:
            ctx.shutdown(su)

    def _handles(self, first: int) -> set[int]:
        found: set[int] = set()
        with self._op("GetCapability(handles)") as ctx:
            more, start = True, first
            while more:
                more, data = ctx.get_capability(TPM2_CAP.HANDLES, start, 64)
                handles = [int(h) for h in data.data.handles]
                found.update(handles)
                if not handles:
                    break
                start = max(handles) + 1
        return found

    # ----------------------------------------------------------------------------------------- keys

    def create_or_load_ak(
        self, handle: int = AK_HANDLE, alg: str = "rsa", hash_alg: str = "sha256"
    ) -> AkPublic:
        """The AK at persistent ``handle``, created there first if the handle is empty.

        Returns the AK with its TPM public area (``.public``, TPM2B form via ``AkPublic.tpm2b_public``), its
        PEM (``.pem``) and TPM name (``.name``). A handle holding a key of another algorithm is an error.
        """
        if alg not in _AK_TEMPLATES:
            raise TpmError(f"unsupported AK algorithm {alg!r}", hint="use 'rsa' or 'ecc'")
        if handle in self._handles(_PERSISTENT_FIRST):
            ak = self.read_public(handle)
            if ak.algorithm != alg or not (ak.public and ak.public.is_restricted_signing):
                raise TpmError(
                    f"persistent handle 0x{handle:08x} holds another key ({ak.algorithm})",
                    hint="evict it or choose another handle",
                )
            return ak
        template = TPM2B_PUBLIC.parse(_AK_TEMPLATES[alg].format(h=hash_alg), objectAttributes=_AK_ATTRS)
        ek_template = self._ek_template("rsa")
        with self._op("create AK", handle=f"0x{handle:08x}", alg=alg) as ctx:
            ek = ctx.create_primary(None, ek_template, ESYS_TR.ENDORSEMENT)[0]
            try:
                with self._ek_session(ctx) as session:
                    private, public = ctx.create(ek, None, template, session1=session)[:2]
                with self._ek_session(ctx) as session:
                    transient = ctx.load(ek, private, public, session1=session)
            finally:
                ctx.flush_context(ek)
            try:
                ctx.evict_control(ESYS_TR.OWNER, transient, handle)
            finally:
                ctx.flush_context(transient)
        return load_ak(public.marshal())

    @staticmethod
    @contextmanager
    def _ek_session(ctx: Any) -> Iterator[Any]:
        """A policy session satisfying the default EK policy (PolicySecret(TPM_RH_ENDORSEMENT))."""
        session = ctx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
        )
        try:
            ctx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            yield session
        finally:
            ctx.flush_context(session)

    def read_public(self, handle: int) -> AkPublic:
        """The public area of the persistent key at ``handle``."""
        with self._op("ReadPublic", handle=f"0x{handle:08x}") as ctx:
            public = ctx.read_public(ctx.tr_from_tpmpublic(TPM2_HANDLE(handle)))[0]
        return load_ak(public.marshal())

    def evict(self, handle: int) -> None:
        """Remove the persistent key at ``handle`` (no-op when the handle is empty)."""
        if handle not in self._handles(_PERSISTENT_FIRST):
            return
        with self._op("EvictControl", handle=f"0x{handle:08x}") as ctx:
            ctx.evict_control(ESYS_TR.OWNER, ctx.tr_from_tpmpublic(TPM2_HANDLE(handle)), handle)

    def _nv_reader(self) -> Any:
        defined = self._handles(_NV_FIRST)
        with self._op("NV read") as ctx:
            reader = NVReadEK(ctx)

        def read(index: int) -> bytes:
            if int(index) not in defined:
                raise NoSuchIndex(index)
            with self._op("NV read", index=f"0x{int(index):08x}"):
                return bytes(reader(index))

        return read

    def _ek_template(self, alg: str) -> Any:
        ektype = _EK_TYPES.get(alg)
        if ektype is None:
            raise TpmError(f"unsupported EK algorithm {alg!r}", hint=f"use one of {', '.join(_EK_TYPES)}")
        try:
            return create_ek_template(ektype, self._nv_reader())[1]
        except ValueError as exc:  # a high-range EK type needs its certificate in NV
            raise TpmError(f"no {ektype} template: {exc}", tcti=self.tcti) from None

    def ek_public(self, alg: str = "rsa") -> bytes:
        """The EK's ``TPM2B_PUBLIC`` (TCG default template), recreated from the endorsement seed."""
        template = self._ek_template(alg)
        with self._op("create EK", alg=alg) as ctx:
            handle, public = ctx.create_primary(None, template, ESYS_TR.ENDORSEMENT)[:2]
            ctx.flush_context(handle)
        return bytes(public.marshal())

    def ek_certificate(self, alg: str = "rsa") -> bytes | None:
        """The EK certificate (DER) from NV, or ``None`` when the TPM has none."""
        try:
            return bytes(self._nv_reader()(EK_CERT_NV_INDEX[alg]))
        except NoSuchIndex:
            return None
        except KeyError:
            raise TpmError(
                f"unsupported EK algorithm {alg!r}", hint=f"use one of {', '.join(_EK_TYPES)}"
            ) from None

    def ek_certificates(self) -> dict[str, bytes]:
        """Every EK certificate the TPM has in NV, by EK algorithm (``rsa``, ``ecc``, ``ecc384``)."""
        found = {alg: self.ek_certificate(alg) for alg in EK_CERT_NV_INDEX}
        return {alg: cert for alg, cert in found.items() if cert is not None}

    def activate_credential(
        self, id_object: bytes, encrypted_secret: bytes, ak_handle: int = AK_HANDLE, ek_alg: str = "rsa"
    ) -> bytes:
        """TPM2_ActivateCredential: the credential the verifier made (TPM2_MakeCredential) for the AK at
        ``ak_handle`` and the EK of ``ek_alg``, from its ``TPM2B_ID_OBJECT`` and ``TPM2B_ENCRYPTED_SECRET``.

        The TPM opens it only if the EK is this TPM's and the AK loaded at ``ak_handle`` has the name the
        credential was made for; anything else is a :class:`TpmError` (an integrity or value error). Only the
        low-range EKs (``rsa``, ``ecc``: policy PolicySecret(endorsement) over SHA-256) are supported.
        """
        if ek_alg not in ("rsa", "ecc"):
            raise TpmError(
                f"ActivateCredential with the {ek_alg!r} EK is not supported",
                hint="use the 'rsa' or 'ecc' EK",
            )
        try:
            blob = TPM2B_ID_OBJECT.unmarshal(bytes(id_object))
            secret = TPM2B_ENCRYPTED_SECRET.unmarshal(bytes(encrypted_secret))
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise TpmError(f"ActivateCredential: malformed credential: {exc}") from None
        if blob[1] != len(id_object) or secret[1] != len(encrypted_secret):
            raise TpmError("ActivateCredential: trailing bytes after the credential")
        template = self._ek_template(ek_alg)
        with self._op("ActivateCredential", ak=f"0x{ak_handle:08x}", ek=ek_alg) as ctx:
            ek = ctx.create_primary(None, template, ESYS_TR.ENDORSEMENT)[0]
            try:
                ak = ctx.tr_from_tpmpublic(TPM2_HANDLE(ak_handle))
                with self._ek_session(ctx) as session:
                    cert_info = ctx.activate_credential(
                        ak, ek, blob[0], secret[0], session1=ESYS_TR.PASSWORD, session2=session
                    )
            finally:
                ctx.flush_context(ek)
        return bytes(cert_info)

    # ----------------------------------------------------------------------------------------- PCRs

    def pcr_extend(self, index: int, digests: Mapping[str, bytes]) -> None:
        """Extend PCR ``index`` with one digest per bank: ``{"sha256": 32 bytes, "sha1": 20 bytes}``."""
        values = []
        for bank, value in digests.items():
            alg = tpm2.hash_id(bank)
            if len(value) != tpm2.DIGEST_SIZES[alg]:
                raise TpmError(
                    f"PCR extend: a {bank} digest has {tpm2.DIGEST_SIZES[alg]} bytes, got {len(value)}"
                )
            values.append(TPMT_HA(hashAlg=alg, digest=TPMU_HA(**{bank: value})))
        with self._op("PCR_Extend", pcr=index) as ctx:
            ctx.pcr_extend(ESYS_TR.PCR0 + index, TPML_DIGEST_VALUES(values))

    def pcr_read(self, indices: Iterable[int], banks: Iterable[str] = ("sha256",)) -> PcrValues:
        """Current values of ``indices`` in each of ``banks`` (read 8 at a time, the TPM's limit)."""
        wanted = sorted(set(indices))
        out: dict[int, dict[int, bytes]] = {}
        for bank in banks:
            alg = tpm2.hash_id(bank)
            values = out.setdefault(alg, {})
            for start in range(0, len(wanted), 8):
                chunk = wanted[start : start + 8]
                with self._op("PCR_Read", bank=bank, pcrs=chunk) as ctx:
                    _, selection, digests = ctx.pcr_read(
                        TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}")
                    )
                got = [
                    i
                    for sel in selection
                    for i in tpm2.pcrs_from_bitmap(bytes(sel.pcrSelect)[: sel.sizeofSelect])
                ]
                for i, value in zip(got, digests, strict=False):
                    values[i] = bytes(value)
                if set(got) != set(chunk):
                    raise TpmError(f"PCR_Read: the TPM has no {bank} PCR(s) {sorted(set(chunk) - set(got))}")
        return PcrValues(out)

    # ----------------------------------------------------------------------------------------- quote

    def quote(
        self,
        ak_handle: int,
        pcrs: Mapping[str, Sequence[int]],
        qualifying_data: bytes,
        hash_alg: str | None = None,
    ) -> Quote:
        """Quote ``pcrs`` (``{"sha256": [10]}``) with the AK at ``ak_handle``, extraData ``qualifying_data``
        (at most 64 bytes). ``hash_alg`` overrides the AK's scheme hash (a restricted AK refuses another).

        The PCR values are read after the quote and checked against its pcrDigest; a PCR extended in between
        makes the client quote again (up to 3 times) so the returned values always match the quote.
        """
        if len(qualifying_data) > 64:
            raise TpmError(f"qualifying data is {len(qualifying_data)} bytes, at most 64 allowed")
        spec = "+".join(f"{bank}:{','.join(map(str, sorted(set(idx))))}" for bank, idx in pcrs.items() if idx)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        if hash_alg is not None:
            ak = self.read_public(ak_handle)
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSASSA if ak.algorithm == "rsa" else TPM2_ALG.ECDSA)
            if ak.public is not None and ak.public.scheme != tpm2.ALG_NULL:
                scheme.scheme = ak.public.scheme
            scheme.details.any.hashAlg = tpm2.hash_id(hash_alg)
        for _attempt in range(_MAX_QUOTE_TRIES):
            with self._op("Quote", ak=f"0x{ak_handle:08x}", pcrs=spec) as ctx:
                key = ctx.tr_from_tpmpublic(TPM2_HANDLE(ak_handle))
                attest, signature = ctx.quote(key, TPML_PCR_SELECTION.parse(spec), qualifying_data, scheme)
            message = bytes(attest.marshal()[2:])
            sig = bytes(signature.marshal())
            parsed = tpm2.parse_attest(message)
            if parsed.quote is None:
                raise TpmError(
                    "the TPM answered Quote with a non-quote TPMS_ATTEST", type=f"0x{parsed.type:04x}"
                )
            values = self.pcr_read(
                {i for idx in pcrs.values() for i in idx}, [b for b, i in pcrs.items() if i]
            )
            concat = b"".join(values.get(alg, i) or b"" for alg, i in parsed.quote.selected())
            sig_hash = tpm2.parse_signature(sig).hash_alg
            if hmac.compare_digest(tpm2.digest(sig_hash, concat), parsed.quote.pcr_digest):
                return Quote(message, sig, values)
        raise TpmError("PCRs kept changing while quoting", hint="retry when the PCRs are quiet", pcrs=spec)
