//! The `Br2kService` custom resource.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Names of Secrets holding credentials, always read from the resource's own
/// namespace. Only names: the credentials themselves never appear in the resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialRefs {
    /// Secret with `username` and `password` (or `token`) keys the operator uses to
    /// read (and repair) the image in the OCI registries of its own configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci_secret: Option<String>,
}

/// What the operator supervises: one service of the on-chain registry.
///
/// The resource names only the service. Everything that decides what runs (the
/// chain, the registry contract, the accounts allowed to own services, the OCI
/// registries) comes from the operator's own configuration, never from the resource;
/// fields a resource written for an older schema still carries (`registryContract`,
/// `rpcEndpoints`, `ociRegistries`) are pruned by the API server.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "br2k.io",
    version = "v1alpha1",
    kind = "Br2kService",
    plural = "br2kservices",
    shortname = "b2s",
    namespaced,
    status = "Br2kServiceStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.serviceId"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.observedVersion"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct Br2kServiceSpec {
    /// The service id in the operator's registry contract (a DNS-1123 label).
    pub service_id: String,
    /// Secrets with credentials (names only, in the resource's namespace).
    #[serde(default)]
    pub credentials: CredentialRefs,
    /// Namespace the workload runs in (default: the resource's own namespace). Any
    /// other namespace must be allowed by the operator's configuration
    /// (`--allow-target-namespace`); otherwise the resource is refused
    /// (`Valid=False`, reason `NamespaceNotAllowed`) and nothing is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Br2kServiceSpec {
    /// The spec of service `id`, its workload in the resource's namespace, no
    /// credentials.
    pub fn for_service(id: impl Into<String>) -> Self {
        Self {
            service_id: id.into(),
            credentials: CredentialRefs::default(),
            namespace: None,
        }
    }
}

/// One status condition (`Ready`, `Valid`, `ChainAvailable`, `ImageVerified`, `WorkloadReady`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason (CamelCase).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// RFC 3339 time the status last changed.
    pub last_transition_time: String,
}

/// The last recovery the operator made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRecovery {
    /// RFC 3339 time it finished.
    pub time: String,
    /// Finding names it acted on.
    pub findings: Vec<String>,
    /// Outcome (`recovered`, `partial`, `failed`).
    pub outcome: String,
    /// Milliseconds from detection to the end of the recovery actions.
    pub duration_ms: u64,
}

/// What the operator last saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Br2kServiceStatus {
    /// Record version the workload was last reconciled against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_version: Option<u64>,
    /// `Healthy`, `Recovering`, `Degraded` or `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The last recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<LastRecovery>,
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// For a service placed across clusters: which cluster runs it, at which epoch,
    /// and the last failover to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementView>,
}

/// The placement of a multi-cluster service as this cluster's operator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementView {
    /// This operator's cluster.
    pub cluster: String,
    /// Its decision: `active`, `standby`, `campaign`, `braked`, `unhealthy` or
    /// `not_listed`.
    pub decision: String,
    /// The cluster holding the placement lease, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_cluster: Option<String>,
    /// The lease's epoch (fencing token), as recorded on chain by the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Why nothing happens when something should (the brake, an unreachable lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The last failover to this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverTimeline>,
}

/// When the steps of a failover to this cluster happened (RFC 3339, milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverTimeline {
    /// No cluster held the lease any more (the active cluster was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected: Option<String>,
    /// This cluster won the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_acquired: Option<String>,
    /// The new placement was recorded on chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
    /// The workload was applied here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<String>,
    /// Every replica was Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
}

/// The CustomResourceDefinition as YAML (what `br2k-operator --print-crd` prints).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = Br2kService::crd();
    format!(
        "# Generated by `br2k-operator --print-crd`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD always serializes")
    )
}
