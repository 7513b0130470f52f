//! Digest-verified, mirrored OCI image store for br2k.
