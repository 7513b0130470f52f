//! `apply` of [`KubeReplicator`]: refuses foreign objects, takes over fields other
//! writers set, applies the ConfigMap and its dependents, gates the rollout and adopts
//! orphaned replica pods.

use br2k_core::{ServiceId, ServiceRecord, WorkloadTemplate};
use futures::FutureExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use super::KubeReplicator;
use super::read_your_writes::{Kind, Written};
use super::requests::{apply_obj, delete_opt, get_opt, meta_of, release_foreign};
use crate::build::{self, Rollout};
use crate::error::KubeError;
use crate::names::{ANNOTATION_CONFIG_HASH, LABEL_SERVICE_ID, Names};
use crate::parse::{self, meta_owned_by, owned_by};
use crate::watch::{cached, cached_meta};

impl KubeReplicator {
    /// Refuses to write when an object of a name br2k would write exists and is not
    /// br2k's for `id` (another service's, or created by someone else): a force-apply
    /// would take it over. Objects the watch cache holds are checked there; the others
    /// are read from the API server.
    async fn refuse_foreign_objects(&self, names: &Names, id: &ServiceId) -> Result<(), KubeError> {
        let ns = self.namespace();
        let ours = |meta: Option<ObjectMeta>| meta.filter(|m| meta_owned_by(m, id));
        let [sts, headless, client, pdb, cm] = self
            .cached_metas(names)
            .await
            .map(|metas| metas.map(ours))
            .unwrap_or_default();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let cms: Api<ConfigMap> = self.api();
        // What the cache shows as ours needs no read; anything else is read.
        let read = |known: Option<ObjectMeta>, fut| async move {
            match known {
                Some(m) => Ok(Some(m)),
                None => fut.await,
            }
        };
        let found = futures::try_join!(
            read(sts, meta_of(&stss, &names.base, "statefulset").boxed()),
            read(headless, meta_of(&svcs, &names.headless, "service").boxed()),
            read(client, meta_of(&svcs, &names.base, "service").boxed()),
            read(
                pdb,
                meta_of(&pdbs, &names.base, "poddisruptionbudget").boxed()
            ),
            read(cm, meta_of(&cms, &names.config, "configmap").boxed()),
        )?;
        let all = [
            ("statefulset", &names.base, found.0),
            ("service", &names.headless, found.1),
            ("service", &names.base, found.2),
            ("poddisruptionbudget", &names.base, found.3),
            ("configmap", &names.config, found.4),
        ];
        for (kind, name, meta) in all {
            if let Some(m) = meta.filter(|m| !meta_owned_by(m, id)) {
                let holder = m
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE_ID))
                    .map_or("another writer (no br2k service label)".to_owned(), |s| {
                        format!("br2k service {s}")
                    });
                return Err(KubeError::Foreign(format!(
                    "{kind} {ns}/{name} exists and belongs to {holder}, not to service {id}: \
                     br2k neither overwrites nor deletes it"
                )));
            }
        }
        Ok(())
    }

    pub(super) async fn apply_inner(&self, record: &ServiceRecord) -> Result<(), KubeError> {
        let ns = self.namespace();
        let names = Names::of(&record.id);
        let cms: Api<ConfigMap> = self.api();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let hpas: Api<HorizontalPodAutoscaler> = self.api();

        let cm_obj = build::config_map(record, &names, ns);

        let live = if record.spec.autoscaling.is_some() {
            get_opt(&stss, &names.base, "statefulset")
                .await?
                .map(|s| parse::sts_replicas(&s))
        } else {
            None
        };
        let replicas = build::replicas_to_apply(record, live);
        let rollout = if self.inner.guard_pods {
            self.rollout_for(record, &names).await
        } else {
            Rollout::Roll
        };

        let has_ports = !record.spec.ports.is_empty();
        self.refuse_foreign_objects(&names, &record.id).await?;
        self.release_foreign_fields(&names).await?;
        let dependents = |owner: Option<OwnerReference>| {
            let mut sts =
                build::stateful_set(record, &names, ns, replicas, rollout, &self.inner.placement);
            build::set_owner(&mut sts.metadata, owner.clone());
            let mut headless = build::headless_service(record, &names, ns);
            build::set_owner(&mut headless.metadata, owner.clone());
            let mut client_svc = build::client_service(record, &names, ns);
            build::set_owner(&mut client_svc.metadata, owner.clone());
            let mut pdb = build::disruption_budget(record, &names, ns, replicas);
            build::set_owner(&mut pdb.metadata, owner.clone());
            let hpa = build::autoscaler(record, &names, ns).map(|mut h| {
                build::set_owner(&mut h.metadata, owner.clone());
                h
            });
            let (stss, svcs, pdbs, hpas, names) = (&stss, &svcs, &pdbs, &hpas, &names);
            async move {
                let hpa_fut = async {
                    match &hpa {
                        Some(h) => apply_obj(hpas, &names.base, h, "autoscaler")
                            .await
                            .map(drop),
                        None => {
                            delete_opt(hpas, &names.base, &DeleteParams::default(), "autoscaler")
                                .await
                        }
                    }
                };
                // Kubernetes refuses a cluster-IP Service without ports: a service
                // without ports gets only the headless one.
                let client_fut = async {
                    if has_ports {
                        apply_obj(svcs, &names.base, &client_svc, "service")
                            .await
                            .map(Some)
                    } else {
                        delete_opt(svcs, &names.base, &DeleteParams::default(), "service")
                            .await
                            .map(|()| None)
                    }
                };
                futures::try_join!(
                    apply_obj(stss, &names.base, &sts, "statefulset"),
                    apply_obj(svcs, &names.headless, &headless, "service"),
                    client_fut,
                    apply_obj(pdbs, &names.base, &pdb, "poddisruptionbudget"),
                    hpa_fut,
                )
                .map(|(sts, headless, client_svc, pdb, ())| (sts, headless, client_svc, pdb))
            }
        };

        // The ConfigMap owns everything else, so its UID goes into every owner
        // reference. When the watch cache knows it (the usual case for a recovery),
        // everything is applied at once; if the ConfigMap turns out to have been
        // replaced meanwhile, the dependents are applied again with the new UID.
        let known_owner = self
            .cache()
            .await
            .and_then(|hub| cached(&hub.cms, &names.config, ns))
            .filter(|cm| owned_by(cm.as_ref(), &record.id))
            .and_then(|cm| build::owner_reference(&cm));
        let (cm, (sts, headless, client_svc, pdb)) = match known_owner {
            Some(owner) => {
                let (cm, deps) = futures::join!(
                    apply_obj(&cms, &names.config, &cm_obj, "configmap"),
                    dependents(Some(owner.clone())),
                );
                let cm = cm?;
                if cm.metadata.uid.as_deref() == Some(owner.uid.as_str()) {
                    (cm, deps?)
                } else {
                    let deps = dependents(build::owner_reference(&cm)).await?;
                    (cm, deps)
                }
            }
            None => {
                let cm = apply_obj(&cms, &names.config, &cm_obj, "configmap").await?;
                let deps = dependents(build::owner_reference(&cm)).await?;
                (cm, deps)
            }
        };
        let rv = |m: &ObjectMeta| m.resource_version.clone();
        self.inner.written.note(
            &record.id,
            Written::Applied(
                vec![
                    (Kind::ConfigMap, names.config.clone(), rv(&cm.metadata)),
                    (Kind::StatefulSet, names.base.clone(), rv(&sts.metadata)),
                    (
                        Kind::Service,
                        names.headless.clone(),
                        rv(&headless.metadata),
                    ),
                ]
                .into_iter()
                .chain(client_svc.map(|s| (Kind::Service, names.base.clone(), rv(&s.metadata))))
                .chain([(
                    Kind::PodDisruptionBudget,
                    names.base.clone(),
                    rv(&pdb.metadata),
                )])
                .collect(),
            ),
        );
        if self.inner.guard_pods {
            self.adopt(&record.id, &sts).await;
        }
        Ok(())
    }

    /// Moves fields that other writers set on the objects of `names` into br2k's
    /// ownership, so that the apply that follows removes them. Objects the watch
    /// cache shows without foreign fields are skipped (no request); without a usable
    /// cache each object is read from the API server.
    async fn release_foreign_fields(&self, names: &Names) -> Result<(), KubeError> {
        let flagged = |meta: Option<ObjectMeta>| {
            meta.is_some_and(|m| m.managed_fields.as_ref().is_some_and(|f| !f.is_empty()))
        };
        let [sts, headless, client, pdb, cm] = match self.cached_metas(names).await {
            Some(metas) => metas.map(flagged),
            None => [true; 5],
        };
        let cms: Api<ConfigMap> = self.api();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        futures::try_join!(
            release_foreign(cm, &cms, &names.config, "configmap"),
            release_foreign(sts, &stss, &names.base, "statefulset"),
            release_foreign(headless, &svcs, &names.headless, "service"),
            release_foreign(client, &svcs, &names.base, "service"),
            release_foreign(pdb, &pdbs, &names.base, "poddisruptionbudget"),
        )?;
        Ok(())
    }

    /// The metadata the watch cache holds of the objects of `names` that `apply`
    /// writes: StatefulSet, headless Service, client Service, PodDisruptionBudget,
    /// ConfigMap (`None` each when absent); `None` when the cache is not usable.
    async fn cached_metas(&self, names: &Names) -> Option<[Option<ObjectMeta>; 5]> {
        let ns = self.namespace();
        let hub = self.cache().await?;
        Some([
            cached_meta(&hub.stss, &names.base, ns),
            cached_meta(&hub.svcs, &names.headless, ns),
            cached_meta(&hub.svcs, &names.base, ns),
            cached_meta(&hub.pdbs, &names.base, ns),
            cached_meta(&hub.cms, &names.config, ns),
        ])
    }

    /// Makes `sts` the controller of the guarded replica pods of `id` that have no
    /// live controller (their StatefulSet was deleted and `sts` re-creates it), as
    /// the StatefulSet controller would on its next sync, but at once and in parallel.
    /// Best effort: the controller adopts whatever this misses.
    async fn adopt(&self, id: &ServiceId, sts: &StatefulSet) {
        let (Some(hub), Some(uid), Some(name)) = (
            self.cache().await,
            sts.metadata.uid.as_deref(),
            sts.metadata.name.as_deref(),
        ) else {
            return;
        };
        let pods: Api<Pod> = self.api();
        let orphans = hub.pods_of(id).into_iter().filter_map(|p| {
            let refs = p.metadata.owner_references.as_deref().unwrap_or_default();
            let guarded = refs.iter().any(|r| r.kind == "ConfigMap");
            let controller = refs.iter().find(|r| r.controller == Some(true));
            // Another controller uid than the live StatefulSet's: that one was deleted.
            let stale = controller.filter(|c| c.kind == "StatefulSet" && c.uid != uid);
            let adoptable = guarded
                && p.metadata.deletion_timestamp.is_none()
                && (controller.is_none() || stale.is_some());
            adoptable.then(|| {
                let mut refs = vec![serde_json::json!({
                    "apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid,
                    // No blockOwnerDeletion: setting it may need permission on the
                    // StatefulSet's finalizers (OwnerReferencesPermissionEnforcement).
                    "controller": true,
                })];
                if let Some(old) = stale {
                    refs.push(serde_json::json!({"$patch": "delete", "uid": old.uid}));
                }
                let patch = serde_json::json!({"metadata": {
                    "uid": p.metadata.uid, "ownerReferences": refs,
                }});
                (p.metadata.name.clone().unwrap_or_default(), patch)
            })
        });
        let patches = orphans.map(|(pod, patch)| {
            let pods = &pods;
            async move {
                if let Err(e) = pods
                    .patch(&pod, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    tracing::debug!(pod = %pod, error = %e, "br2k: adopting a replica failed");
                }
            }
        });
        futures::future::join_all(patches).await;
    }

    /// [`Rollout::Frozen`] when the watch cache shows replicas and every live replica
    /// already runs the record's template (so a differing live template is tampering,
    /// and no pod needs to change); [`Rollout::Roll`] otherwise, including when the
    /// cache is not usable. After a roll completes, the watch hub freezes the
    /// StatefulSet again.
    async fn rollout_for(&self, record: &ServiceRecord, names: &Names) -> Rollout {
        let Some(hub) = self.cache().await else {
            return Rollout::Roll;
        };
        // A pod that started with the record's config hash read the record's values,
        // whatever the live ConfigMap says now (it may be tampered): its environment
        // is resolved against the ConfigMap the record asks for.
        let cm = build::config_map(record, names, self.namespace());
        let want = WorkloadTemplate::from_spec(&record.spec);
        let want_config = build::config_hash(&record.spec);
        let pods: Vec<_> = hub
            .pods_of(&record.id)
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        // A pod read its environment when it started: the config hash it started with
        // says which values it has.
        let runs_record = |p: &Pod| {
            let started_with = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_CONFIG_HASH));
            started_with == Some(&want_config)
                && p.spec
                    .as_ref()
                    .and_then(|s| parse::template_of_pod(s, Some(&cm)).ok())
                    .is_some_and(|mut t| {
                        // The same digest from another registry (a switch to a
                        // mirror) is the same image: no reason to restart a pod.
                        if t.image.digest().is_some() && t.image.digest() == want.image.digest() {
                            t.image = want.image.clone();
                        }
                        t == want
                    })
        };
        if !pods.is_empty() && pods.iter().all(|p| runs_record(p)) {
            Rollout::Frozen
        } else {
            Rollout::Roll
        }
    }
}
