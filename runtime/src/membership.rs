//! Member and cluster identity: etcd's member ID and cluster ID derivations, and this
//! member's description as the Cluster service reports it.
//!
//! This module owns the ID arithmetic only. It must never invent IDs another way (random,
//! time-based at bootstrap): clients and tools compare `cluster_id` / `member_id` in
//! response headers against what etcd would compute for the same flags, and a member
//! started twice with the same flags must get the same IDs.

use sha1::{Digest, Sha1};

use crate::config::{Config, HttpUrl};

/// etcd's `computeMemberId` for bootstrap (no timestamp): SHA-1 over the sorted peer URLs
/// concatenated without separator, followed by the cluster token; the first 8 bytes of the
/// digest, big-endian.
pub fn member_id(peer_urls: &[HttpUrl], cluster_token: &str) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(HttpUrl::as_str).collect();
    urls.sort_unstable();
    let mut hasher = Sha1::new();
    for url in urls {
        hasher.update(url.as_bytes());
    }
    hasher.update(cluster_token.as_bytes());
    first_u64(&hasher.finalize())
}

/// etcd's `RaftCluster.genID`: SHA-1 over the sorted member IDs, each as 8 big-endian
/// bytes; the first 8 bytes of the digest, big-endian.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut hasher = Sha1::new();
    for id in ids {
        hasher.update(id.to_be_bytes());
    }
    first_u64(&hasher.finalize())
}

fn first_u64(digest: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Who this member is: the identity every response header carries and MemberList shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub member_id: u64,
    pub cluster_id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    /// `--initial-cluster-token`: members added later get IDs derived with it.
    pub cluster_token: String,
}

impl Identity {
    /// The identity etcd would bootstrap with from these flags.
    pub fn from_config(config: &Config) -> Self {
        let token = &config.initial_cluster_token;
        let member_ids: Vec<u64> = config
            .initial_cluster
            .values()
            .map(|urls| member_id(urls, token))
            .collect();
        Self {
            cluster_token: token.clone(),
            member_id: member_id(config.local_peer_urls(), token),
            cluster_id: cluster_id(&member_ids),
            name: config.name.clone(),
            peer_urls: config
                .initial_advertise_peer_urls
                .iter()
                .map(|u| u.as_str().to_string())
                .collect(),
            client_urls: config
                .advertise_client_urls
                .iter()
                .map(|u| u.as_str().to_string())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Flags;
    use clap::Parser;

    #[test]
    fn default_member_gets_etcds_well_known_ids() {
        let url = HttpUrl::parse("http://localhost:2380").unwrap();
        let m = member_id(&[url], "etcd-cluster");
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m])), "cdf818194e3a8c32");
    }

    #[test]
    fn default_flags_give_default_identity() {
        let config =
            Config::from_flags(Flags::parse_from(["metastore", "--engine", "memory"])).unwrap();
        let id = Identity::from_config(&config);
        assert_eq!(id.member_id, 0x8e9e05c52164694d);
        assert_eq!(id.cluster_id, 0xcdf818194e3a8c32);
        assert_eq!(id.peer_urls, vec!["http://localhost:2380".to_string()]);
        assert_eq!(id.client_urls, vec!["http://localhost:2379".to_string()]);
    }

    #[test]
    fn ids_ignore_url_order_and_depend_on_token() {
        let a = HttpUrl::parse("http://a:1").unwrap();
        let b = HttpUrl::parse("http://b:1").unwrap();
        assert_eq!(
            member_id(&[a.clone(), b.clone()], "t"),
            member_id(&[b.clone(), a.clone()], "t")
        );
        assert_ne!(
            member_id(std::slice::from_ref(&a), "t"),
            member_id(&[a], "u")
        );
        assert_eq!(cluster_id(&[1, 2]), cluster_id(&[2, 1]));
    }
}
