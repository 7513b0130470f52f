//! Replicated log on etcd for br2k.
