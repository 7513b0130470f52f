//! Kubernetes replicator and drift detection for br2k.
