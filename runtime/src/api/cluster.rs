//! etcd's Cluster service: MemberList for the single member. Membership changes
//! (add, remove, update, promote) answer `Unimplemented` until Raft gives them meaning.
//!
//! This module owns how a member is described to clients. It must never report members
//! it does not know to exist: clients dial every listed client URL.

use std::sync::Arc;

use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use super::Api;

pub struct ClusterService {
    api: Arc<Api>,
}

impl ClusterService {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.api.read_barrier().await?;
        }
        let id = &self.api.identity;
        // Other members' client URLs become known when they publish them through the
        // log (etcd's member attributes); until then they are listed without any.
        let members = id
            .initial_members
            .iter()
            .map(|(member, name, peer_urls)| {
                if *member == id.member_id {
                    pb::Member {
                        id: id.member_id,
                        name: id.name.clone(),
                        peer_ur_ls: id.peer_urls.clone(),
                        client_ur_ls: id.client_urls.clone(),
                        is_learner: false,
                    }
                } else {
                    pb::Member {
                        id: *member,
                        name: name.clone(),
                        peer_ur_ls: peer_urls.clone(),
                        client_ur_ls: Vec::new(),
                        is_learner: false,
                    }
                }
            })
            .collect();
        let mut resp = pb::MemberListResponse {
            header: None,
            members,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}
