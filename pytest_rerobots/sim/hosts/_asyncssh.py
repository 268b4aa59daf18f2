"""asyncssh, imported so that the one deprecation it raises at import time stays quiet.

cryptography 51 deprecates DSA (pyca/cryptography pull request 15597): naming any of
``cryptography.hazmat.primitives.asymmetric.dsa``'s public types warns, and asyncssh up to
at least 2.24.1 names them at import, in ``asyncssh.crypto.misc`` and ``asyncssh.crypto.dsa``
(the same family as asyncssh issue 826, the FFDH deprecation of cryptography 50). Under a
user's ``filterwarnings = error`` that warning would end their run with an INTERNALERROR the
moment the simulator starts. Only that warning, raised from those two asyncssh modules, is
silenced, and only while asyncssh is imported; the simulator never uses DSA keys. Every
other warning, from asyncssh or anything else, goes where the user's filters send it.
"""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"DSA is deprecated",
        category=CryptographyDeprecationWarning,
        module=r"asyncssh\.crypto\.(misc|dsa)$",
    )
    import asyncssh

__all__ = ["asyncssh"]
