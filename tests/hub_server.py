"""The loopback Hugging Face Hub, under the name the tests have always imported; it lives in `loopback_hub/`."""

from loopback_hub import (  # noqa: F401  (re-exported)
    DEFAULT_EXTENSIONS,
    DEFAULT_GITATTRIBUTES,
    INVALID_CREDENTIALS,
    WRITE_ORG_ROLES,
    Answer,
    HubError,
    LoopbackHub,
    Request,
    Token,
    git_blob_oid,
)
