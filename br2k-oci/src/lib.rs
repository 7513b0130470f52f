//! Digest-verified, mirrored OCI image store for br2k.
//!
//! - [`OciImageStore`]: one OCI (Distribution) registry behind
//!   [`br2k_core::ImageStore`]; every read is verified against its digest, indexes
//!   resolve to a platform, copies stream blobs between registries in parallel and
//!   skip what the target has, and image layouts (directory or tarball) can be pushed.
//! - [`MirroredImageStore`]: a primary and mirrors with failover reads, quorum writes
//!   and [`MirroredImageStore::repair`].
//! - [`ImageBuilder`]: packs files into a reproducible single-layer image without a
//!   container engine.
//!
//! # Transport
//!
//! Registry requests go through the [`oci_client`] crate (`oci_client::Client`, one
//! per store, monolithic push): blob `HEAD` (skip what the target has), blob `GET`
//! (streamed), blob upload (`POST`, then one `PUT` whose body streams from the source
//! download through br2k's hashing and verifying wrapper, never a whole blob in
//! memory), cross-repository mount and manifest `PUT`. A minimal reqwest path remains
//! for what oci-client cannot do or does in a way br2k cannot use: `DELETE` (oci-client
//! has none), manifest `GET` (read with the
//! [`MAX_MANIFEST_BYTES`](br2k_core::artifact::MAX_MANIFEST_BYTES) bound enforced while
//! reading; oci-client reads bodies whole), manifest `HEAD` and `GET /v2/` (see the
//! `transport` module for why), and the requests to a token server.
//! [`OciImageStore::request_counts`] counts requests per operation br2k issues.
//!
//! # Authentication
//!
//! [`OciConfig::with_auth`] (or [`OciConfig::with_auth_from_env`]) picks one of:
//!
//! - [`Auth::Anonymous`]: no credentials. Against a registry that uses token
//!   authentication the store still fetches anonymous tokens (enough for public
//!   repositories and for `GET /v2/`).
//! - [`Auth::Basic`]: a user name and password. Sent as HTTP basic auth to registries
//!   that check it themselves (htpasswd); to registries that delegate to a token
//!   server, only the token server sees them.
//! - [`Auth::Bearer`]: a static token, sent as `Authorization: Bearer <token>` on every
//!   request, never refreshed (the caller owns its lifetime).
//!
//! **Registry token authentication** (the Docker Registry token specification, used
//! by Docker Hub, GHCR, Harbor, GitLab, `docker-registry` with `auth: token`) needs no
//! setting: with `Anonymous` or `Basic`, a `401` whose `WWW-Authenticate` is
//! `Bearer realm="...",service="...",scope="..."` makes the store `GET` a token from
//! the realm (`service`, one `scope` parameter per scope, `account` and basic
//! credentials when configured), read `token` or `access_token` from the JSON answer,
//! and send the request once more with `Authorization: Bearer <token>` (for requests
//! made by oci-client, which does not report the challenge, the store learns it from a
//! `GET /v2/` after the `401`). From then on
//! each request asks for the scopes Distribution checks (`repository:<name>:pull` for
//! GET/HEAD, `pull,push` for uploads and manifest PUTs, plus `pull` on the source of a
//! cross-repository mount, `delete` for DELETE), so a token is fetched ahead of the
//! request, not after a `401`. Tokens are cached per scope until `expires_in` (60 s
//! when absent) runs out, less a margin (a tenth, at most 10 s); a token the registry
//! rejects anyway (`401` again) is replaced once. br2k's tokens are handed to
//! oci-client through its token cache (`oci_client::Client::tokens`) before each of
//! its calls, for the repository and operation the call looks up, so oci-client
//! does not fetch tokens of its own while br2k's are valid (it would, with the same
//! credentials, only for a token it considers expired before br2k does). A streamed
//! blob copy refused with `401` is started once more from the source download. A plain-HTTP realm is accepted only for a registry configured insecure,
//! so credentials never go out unencrypted by surprise. Challenges are parsed by
//! [`auth::parse_challenges`] (quoted values with commas and escapes, several
//! challenges and scopes, unknown parameters); a malformed one is an
//! [`auth::ChallengeError`], surfaced as a non-retryable backend error. A refused
//! token request (wrong password) and a token without the needed access are
//! `permission_denied`.
//!
//! Passwords and tokens are kept in [`Secret`] and sensitive header values: `Debug`
//! of the config and the store shows `<redacted>` and the number of cached tokens,
//! never their values, and nothing logs them.

pub mod auth;
mod builder;
mod challenge;
mod config;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod index;
mod layout;
mod mirror;
mod store;
mod transport;

pub use builder::{DEFAULT_USER, ImageBuilder};
pub use config::{Auth, BlobProgress, OciConfig, PlatformSpec, Secret};
pub use index::{ImageIndex, IndexEntry, ManifestDoc, Platform, parse_manifest_doc};
pub use layout::{MAX_LAYOUT_BYTES, MAX_LAYOUT_ENTRIES, REF_NAME, write_layout};
pub use mirror::{MirroredImageStore, PullReport, RepairReport, RepairStatus, Skipped};
pub use store::{FetchedDoc, OciImageStore};
pub use transport::RequestCounts;
