# Loaded into the Autobahn|Testsuite venv (Python 2.7) by a .pth file that
# scripts/setup-test-deps.sh installs. The 2.7 interpreter this image provides was built
# without OpenSSL's _hashlib, so hashlib.sha1 falls back to the slow C `_sha` module, and
# wstest's 12.*/13.* cases hash every message they send and receive: about a quarter of the
# whole deflate run's CPU. This gives hashlib.sha1 OpenSSL's SHA-1 through `cryptography`
# (already in the venv for pyOpenSSL): same digests, ~8x faster. Nothing else changes, and
# nothing happens where _hashlib exists.
#
# Also: case12_x_x.sendOne (every 12.*/13.* case) decodes the whole test-data file from
# UTF-8 once per message sent, only to slice a message out of it; the decoded text is
# cached per case instead (the same message bytes go on the wire).
import hashlib
import sys
import warnings

try:
    import _hashlib  # noqa: F401  (a normal build: keep its fast sha1)
except ImportError:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cryptography.hazmat.backends import default_backend
            from cryptography.hazmat.primitives import hashes
    except Exception:  # no cryptography: stay with the slow one
        hashes = None

    if hashes is not None:
        _backend = default_backend()

        class _Sha1(object):
            name = "sha1"
            digest_size = 20
            block_size = 64

            def __init__(self, data=b"", _ctx=None):
                self._h = _ctx if _ctx is not None else hashes.Hash(hashes.SHA1(), _backend)
                if data:
                    self._h.update(bytes(data))

            def update(self, data):
                self._h.update(bytes(data))

            def copy(self):
                return _Sha1(_ctx=self._h.copy())

            def digest(self):
                return self._h.copy().finalize()

            def hexdigest(self):
                return self.digest().encode("hex")

        def sha1(data=b""):
            return _Sha1(data)

        hashlib.sha1 = sha1


class _Case12Patch(object):
    """Patches autobahntestsuite.case.case12_x_x when wstest imports it."""

    NAME = "autobahntestsuite.case.case12_x_x"

    def find_module(self, fullname, path=None):
        return self if fullname == self.NAME else None

    def load_module(self, fullname):
        sys.meta_path.remove(self)
        __import__(fullname)
        module = sys.modules[fullname]
        original = module.sendOne

        def send_one(self):
            if not self.TESTDATA["binary"]:
                decoded = getattr(self, "_ringway_decoded", None)
                if decoded is None or decoded[0] is not self.testData:
                    decoded = (self.testData, self.testData.decode("utf-8"))
                    self._ringway_decoded = decoded

                class _Cached(str):
                    def decode(inner, *a):
                        return decoded[1]

                data, self.testData = self.testData, _Cached(self.testData)
                try:
                    return original(self)
                finally:
                    self.testData = data
            return original(self)

        # The case classes were made with `type(...)` around the function itself.
        for value in list(vars(module).values()):
            for cls in value if isinstance(value, list) else ():
                if isinstance(cls, type) and cls.__dict__.get("sendOne") is original:
                    cls.sendOne = send_one
        return module


sys.meta_path.append(_Case12Patch())
