//! etcd's Cluster service: MemberList, MemberAdd (voter or learner), MemberRemove,
//! MemberUpdate and MemberPromote.
//!
//! This module owns etcd's checks before a membership change is proposed (URL syntax, the
//! strict reconfiguration check that enough members are started) and how members are
//! described to clients. It must never change the member set except through a raft
//! configuration change (`Replicator::change_members`) or the log (MemberUpdate), whose
//! apply re-checks etcd's rules, and never list a member the state does not hold.

use std::sync::Arc;

use metastore_core::ApplyResponse;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::cluster_server::Cluster;
use metastore_proto::metastore::internal_request::Request as Envelope;
use metastore_proto::metastore::member_change::Change;
use metastore_proto::metastore::MemberChange;
use tonic::{Request, Response, Status};

use super::{forward, Api};
use crate::config::HttpUrl;
use crate::error::{ClusterError, Error};
use crate::status::EtcdError;

pub struct ClusterService {
    api: Arc<Api>,
}

impl ClusterService {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }

    fn members(&self) -> Result<Vec<pb::Member>, Status> {
        self.api.read(|sm| sm.members())
    }

    /// etcd's strict reconfiguration check: after the change, the members that have
    /// started (published their name) must still form a quorum of the voters.
    fn check_started(&self, change: &Change) -> Result<(), Status> {
        let members = self.members()?;
        let voters: Vec<&pb::Member> = members.iter().filter(|m| !m.is_learner).collect();
        let started = |ms: &[&pb::Member]| ms.iter().filter(|m| !m.name.is_empty()).count();
        let (nmembers, nstarted) = match change {
            Change::Add(m) if m.is_learner => return Ok(()),
            // The new member counts, and has not started yet.
            Change::Add(_) => (voters.len() + 1, started(&voters)),
            Change::Remove(id) => {
                let rest: Vec<&pb::Member> =
                    voters.iter().copied().filter(|m| m.id != *id).collect();
                (rest.len(), started(&rest))
            }
            // The learner counts, as started.
            Change::Promote(_) => (voters.len() + 1, started(&voters) + 1),
        };
        // Adding a second member to a one-member cluster is how etcd restores a cluster.
        if matches!(change, Change::Add(_)) && nstarted == 1 && nmembers == 2 {
            return Ok(());
        }
        if nstarted < nmembers / 2 + 1 {
            return Err(Error::Cluster(ClusterError::NotEnoughStarted).into());
        }
        Ok(())
    }

    async fn change(&self, change: Change) -> Result<Vec<pb::Member>, Status> {
        self.check_started(&change)?;
        let applied = self
            .api
            .log
            .change_members(MemberChange {
                change: Some(change),
            })
            .await
            .map_err(Status::from)?;
        members_of(applied)
    }

    /// Sends a MemberPromote on to the leader. Like etcd, tries again while the member it
    /// reached turns out not to lead (an election in between), for a while.
    async fn promote_on_leader(
        &self,
        id: u64,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let deadline = tokio::time::Instant::now() + forward::RETRY_FOR;
        loop {
            let mut client = ClusterClient::new(self.api.leader_channel().await?);
            let mut ask = Request::new(pb::MemberPromoteRequest { id });
            forward::mark(&mut ask);
            match client.member_promote(ask).await {
                Err(e)
                    if e.message() == EtcdError::NotLeader.status().message()
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
                Ok(answer) => {
                    let mut resp = answer.into_inner();
                    self.api.fill(&mut resp.header);
                    return Ok(Response::new(resp));
                }
            }
        }
    }
}

fn members_of(applied: ApplyResponse) -> Result<Vec<pb::Member>, Status> {
    match applied {
        ApplyResponse::Members(members) => Ok(members),
        other => Err(Error::Internal(format!("membership change answered {other:?}")).into()),
    }
}

/// etcd's `types.NewURLs` check of peer URLs.
fn peer_urls(urls: &[String]) -> Result<Vec<String>, Status> {
    if urls.is_empty() {
        return Err(EtcdError::MemberBadUrls.status());
    }
    let mut out = Vec::new();
    for u in urls {
        let parsed = HttpUrl::parse(u).map_err(|_| EtcdError::MemberBadUrls.status())?;
        out.push(parsed.as_str().to_string());
    }
    out.sort();
    Ok(out)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        let urls = peer_urls(&r.peer_ur_ls)?;
        let parsed: Vec<HttpUrl> = urls.iter().filter_map(|u| HttpUrl::parse(u).ok()).collect();
        // The ID is etcd's derivation without the time component, so the new member
        // derives the same ID from its own flags.
        let id = crate::membership::member_id(&parsed, &self.api.identity.cluster_token);
        let member = pb::Member {
            id,
            name: String::new(),
            peer_ur_ls: urls,
            client_ur_ls: Vec::new(),
            is_learner: r.is_learner,
        };
        let members = self.change(Change::Add(member.clone())).await?;
        let mut resp = pb::MemberAddResponse {
            header: None,
            member: Some(member),
            members,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.api.refuse_learner()?;
        let id = request.into_inner().id;
        if !self.members()?.iter().any(|m| m.id == id) {
            return Err(Error::Core(metastore_core::Error::MemberNotFound).into());
        }
        let members = self.change(Change::Remove(id)).await?;
        let mut resp = pb::MemberRemoveResponse {
            header: None,
            members,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        let urls = peer_urls(&r.peer_ur_ls)?;
        let update = pb::Member {
            id: r.id,
            peer_ur_ls: urls,
            ..Default::default()
        };
        let members = members_of(self.api.propose(Envelope::MemberUpdate(update)).await?)?;
        let mut resp = pb::MemberUpdateResponse {
            header: None,
            members,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.api.refuse_learner()?;
        let forwarded = forward::is_forwarded(&request);
        let id = request.into_inner().id;
        match self.members()?.iter().find(|m| m.id == id) {
            None => return Err(Error::Core(metastore_core::Error::MemberNotFound).into()),
            Some(m) if !m.is_learner => {
                return Err(Error::Core(metastore_core::Error::MemberNotLearner).into())
            }
            Some(_) => {}
        }
        // Only the leader knows whether the learner's log has caught up: a member that
        // does not lead asks the leader (etcd's `PromoteMember`).
        if !self.api.log.is_leader() {
            if forwarded {
                return Err(EtcdError::NotLeader.status());
            }
            return self.promote_on_leader(id).await;
        }
        let members = self.change(Change::Promote(id)).await?;
        let mut resp = pb::MemberPromoteResponse {
            header: None,
            members,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.api.refuse_learner()?;
        if request.into_inner().linearizable {
            self.api.read_barrier().await?;
        }
        let mut resp = pb::MemberListResponse {
            header: None,
            members: self.members()?,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}
