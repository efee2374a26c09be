"""Model weight commitments: a dm-verity hash tree identical to ``veritysetup format``, a reproducible EROFS
image of a model directory, the commitment file that publishes both, and the verifier rule made from it.

Stable surface::

    root_hash(path, salt=..., algorithm="sha256") -> bytes
    format_tree(data_path, hash_path | None, salt, uuid=None, ...) -> VerityResult
    build_image(model_dir, image_path, uuid=...) -> ImageResult
    commit_model(model_dir, out_dir, model_id=..., revision=...) -> CommitResult
    load_commitment(path) -> Commitment;  derive_salt(model_id, revision) -> bytes
    verify_image(image, commitment, hash_path=None) -> VerifyOutcome
    policy_rule_from_commitment(commitment) -> dict;  policy_toml_snippet(commitment) -> str

The formats are described in docs/commitment.md.
"""

from tmb.verity.build import CommitResult, commit_model
from tmb.verity.commitment import (
    Commitment,
    derive_salt,
    derive_uuid,
    load_commitment,
    policy_rule_from_commitment,
    policy_toml_snippet,
    write_commitment,
)
from tmb.verity.errors import CommitmentError, ModelTreeError, ToolError, VerityError, VerityInputError
from tmb.verity.image import FileEntry, ImageResult, build_image, mkfs_erofs_version
from tmb.verity.layout import ALGORITHMS, Superblock, parse_salt, read_superblock, tree_geometry
from tmb.verity.tree import VerityResult, format_tree, root_hash
from tmb.verity.verify import TreeComparison, VerifyOutcome, compare_tree, verify_image

__all__ = [
    "ALGORITHMS",
    "CommitResult",
    "Commitment",
    "CommitmentError",
    "FileEntry",
    "ImageResult",
    "ModelTreeError",
    "Superblock",
    "ToolError",
    "TreeComparison",
    "VerifyOutcome",
    "VerityError",
    "VerityInputError",
    "VerityResult",
    "build_image",
    "commit_model",
    "compare_tree",
    "derive_salt",
    "derive_uuid",
    "format_tree",
    "load_commitment",
    "mkfs_erofs_version",
    "parse_salt",
    "policy_rule_from_commitment",
    "policy_toml_snippet",
    "read_superblock",
    "root_hash",
    "tree_geometry",
    "verify_image",
    "write_commitment",
]
