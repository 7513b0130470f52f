//! How the operator builds a supervisor for one `Br2kService`: the backends it
//! composes (the operator is an example: it may depend on every backend; backends
//! never depend on each other).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use br2k_core::supervisor::Supervisor;
use br2k_core::{Error, ImageStore, Registry, Result, ValidationError};
use br2k_k8s::KubeReplicator;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use parking_lot::Mutex;

use crate::crd::Br2kServiceSpec;

/// Supervisor events kept per resource (the controller does not subscribe; a
/// supervisor per resource with the default buffer costs ~1 MiB each).
const OPERATOR_EVENT_BUFFER: usize = 16;

/// Builds the supervisor of one resource.
#[async_trait]
pub trait Backends: Send + Sync + std::fmt::Debug + 'static {
    /// A supervisor for `spec` whose workload runs in `namespace`; `cr_namespace`
    /// holds the credential Secrets.
    async fn supervisor(
        &self,
        client: &Client,
        cr_namespace: &str,
        namespace: &str,
        spec: &Br2kServiceSpec,
    ) -> Result<Supervisor>;
}

/// One [`KubeReplicator`] per workload namespace, shared by every resource whose
/// workload lives there, so that all of them read one watch cache (one watch per
/// kind and namespace, not per resource). Clones share the pool.
#[derive(Debug, Clone, Default)]
pub struct ReplicatorPool {
    map: Arc<Mutex<HashMap<String, Arc<KubeReplicator>>>>,
}

impl ReplicatorPool {
    /// The replicator of `namespace`, made with `client` on first use.
    pub fn get(&self, client: &Client, namespace: &str) -> Arc<KubeReplicator> {
        let mut map = self.map.lock();
        map.entry(namespace.to_owned())
            .or_insert_with(|| Arc::new(KubeReplicator::new(client.clone(), namespace)))
            .clone()
    }
}

/// The real backends: the on-chain registry (`br2k-chain`) and the OCI registries
/// (`br2k-oci`) of the operator's own configuration, the trust anchors. A resource
/// only chooses the service id (and a credential Secret of its own namespace).
///
/// `Debug` shows the RPC endpoints without credentials, path or query (see
/// [`br2k_chain::ChainConfig`]).
#[derive(Debug, Clone)]
pub struct ChainOciBackends {
    /// The chain: RPC endpoints, registry contract, chain id, read depth, quorum.
    pub chain: br2k_chain::ChainConfig,
    /// OCI registries holding the service images, primary first (`host:port`).
    pub oci_registries: Vec<String>,
    /// Treat loopback OCI registries (127.0.0.1, localhost) as plain HTTP.
    pub insecure_loopback: bool,
    /// The shared replicators.
    pub replicators: ReplicatorPool,
    /// How long a verification of an image's bytes is trusted (`None`: the
    /// supervisor's default). Applies always verify anew.
    pub verify_ttl: Option<Duration>,
    /// Accounts whose services may be deployed (`None`: any owner).
    pub allowed_owners: Option<Vec<br2k_core::Account>>,
    /// With whole-cluster failover: the decisions the supervisors follow (a service
    /// placed across clusters runs only where its placement is held).
    pub placement: Option<br2k_core::failover::Decisions>,
}

impl ChainOciBackends {
    /// Backends reading the registry of `chain` (which must name RPC endpoints, the
    /// registry contract and the chain id) and verifying images in `oci_registries`
    /// (at least one, primary first); any owner, default verification period, TLS
    /// registries.
    pub fn new(chain: br2k_chain::ChainConfig, oci_registries: Vec<String>) -> Result<Self> {
        if chain.rpc_urls.is_empty() {
            return Err(
                ValidationError::malformed("operator configuration", "no RPC endpoint").into(),
            );
        }
        if chain.registry_address.is_none() {
            return Err(ValidationError::malformed(
                "operator configuration",
                "no registry contract",
            )
            .into());
        }
        if chain.expected_chain_id.is_none() {
            return Err(ValidationError::malformed("operator configuration", "no chain id").into());
        }
        if oci_registries.is_empty() {
            return Err(
                ValidationError::malformed("operator configuration", "no OCI registry").into(),
            );
        }
        for host in &oci_registries {
            br2k_oci::OciConfig::new(host.clone())
                .map_err(|e| ValidationError::malformed("oci registry", e))?;
        }
        Ok(Self {
            chain,
            oci_registries,
            insecure_loopback: false,
            replicators: ReplicatorPool::default(),
            verify_ttl: None,
            allowed_owners: None,
            placement: None,
        })
    }
}

async fn oci_auth(client: &Client, ns: &str, spec: &Br2kServiceSpec) -> Result<br2k_oci::Auth> {
    let Some(name) = &spec.credentials.oci_secret else {
        return Ok(br2k_oci::Auth::Anonymous);
    };
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| Error::unavailable(format!("read secret {ns}/{name}: {e}")))?;
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| {
        data.get(k)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    match (get("username"), get("password"), get("token")) {
        (Some(username), Some(password), _) => Ok(br2k_oci::Auth::Basic {
            username,
            password: br2k_oci::Secret::new(password),
        }),
        (_, _, Some(token)) => Ok(br2k_oci::Auth::Bearer(br2k_oci::Secret::new(token))),
        _ => Err(ValidationError::malformed(
            "credential secret",
            format!("{ns}/{name} needs username+password or token keys"),
        )
        .into()),
    }
}

#[async_trait]
impl Backends for ChainOciBackends {
    async fn supervisor(
        &self,
        client: &Client,
        cr_namespace: &str,
        namespace: &str,
        spec: &Br2kServiceSpec,
    ) -> Result<Supervisor> {
        // The supervisor only reads the registry: a read-only connection, no key.
        let mut registry: Arc<dyn Registry> =
            Arc::new(br2k_chain::ChainRegistry::connect(self.chain.clone()).await?);
        if let Some(decisions) = &self.placement {
            registry = Arc::new(br2k_core::failover::PlacedRegistry::new(
                registry,
                decisions.clone(),
            ));
        }
        let auth = oci_auth(client, cr_namespace, spec).await?;
        let mut b = Supervisor::builder()
            // The controller calls `reconcile` and never subscribes to events.
            .event_buffer(OPERATOR_EVENT_BUFFER)
            .registry(registry)
            .replicator(self.replicators.get(client, namespace));
        if let Some(ttl) = self.verify_ttl {
            b = b.verify_ttl(ttl);
        }
        if let Some(owners) = &self.allowed_owners {
            b = b.allowed_owners(owners.iter().cloned());
        }
        for host in &self.oci_registries {
            let loopback = host.starts_with("127.0.0.1") || host.starts_with("localhost");
            let cfg = br2k_oci::OciConfig::new(host.clone())
                .map_err(|e| ValidationError::malformed("oci registry", e))?
                .with_insecure(self.insecure_loopback && loopback)
                .with_auth(auth.clone());
            let store: Arc<dyn ImageStore> = Arc::new(br2k_oci::OciImageStore::new(cfg)?);
            b = b.image_store(store);
        }
        b.build()
    }
}

/// In-process backends (`br2k_core::memory` or any other implementation) shared by
/// every resource: for tests and demos.
#[derive(Debug, Clone)]
pub struct SharedBackends {
    /// The registry.
    pub registry: Arc<dyn Registry>,
    /// The image stores, primary first.
    pub stores: Vec<Arc<dyn ImageStore>>,
    /// The shared replicators.
    pub replicators: ReplicatorPool,
}

#[async_trait]
impl Backends for SharedBackends {
    async fn supervisor(
        &self,
        client: &Client,
        _cr_namespace: &str,
        namespace: &str,
        _spec: &Br2kServiceSpec,
    ) -> Result<Supervisor> {
        let mut b = Supervisor::builder()
            // The controller calls `reconcile` and never subscribes to events.
            .event_buffer(OPERATOR_EVENT_BUFFER)
            .registry(self.registry.clone())
            .replicator(self.replicators.get(client, namespace));
        for s in &self.stores {
            b = b.image_store(s.clone());
        }
        b.build()
    }
}
