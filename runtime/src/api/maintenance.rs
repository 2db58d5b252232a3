//! etcd's Maintenance service: what one member can already answer (Status, Hash, HashKV,
//! Alarm). Everything else answers `Unimplemented` through the generated
//! defaults.
//!
//! This module owns the shape of Status and the hashing calls. It must never hash or size
//! anything itself: hashes are core's (so every engine and member agrees), sizes are the
//! engine's.

use std::sync::Arc;

use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use tonic::{Request, Response, Status};

use metastore_core::ApplyResponse;
use metastore_proto::metastore::internal_request::Request as Envelope;

use super::Api;
use crate::config::ETCD_API_VERSION;
use crate::error::Error;
use crate::replication::read_state;

pub struct MaintenanceService {
    api: Arc<Api>,
}

impl MaintenanceService {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }

    /// Runs a whole-store computation off the async threads: hashing reads every key.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Api) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let api = self.api.clone();
        crate::blocking(move || f(&api))
            .await
            .map_err(|e| Status::from(Error::Internal(format!("hash task failed: {e}"))))?
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    // The real stubs answer the RPCs not written yet with `Unimplemented`
    // (`generate_default_stubs`); the madsim stubs have no defaults, so the simulated
    // build spells the same answers out.
    #[cfg(madsim)]
    type SnapshotStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send + 'static>,
    >;

    #[cfg(madsim)]
    async fn snapshot(
        &self,
        _request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented("Not yet implemented"))
    }

    #[cfg(madsim)]
    async fn defragment(
        &self,
        _request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        Err(Status::unimplemented("Not yet implemented"))
    }

    #[cfg(madsim)]
    async fn downgrade(
        &self,
        _request: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(Status::unimplemented("Not yet implemented"))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.api.refuse_learner()?;
        let target = request.into_inner().target_id;
        self.api
            .log
            .move_leader(target)
            .await
            .map_err(Status::from)?;
        let mut resp = pb::MoveLeaderResponse::default();
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// etcd serves every Alarm action, GET included, through the log: the answer is the
    /// replicated alarm set at that point of the log.
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        metastore_core::alarm::validate(&r).map_err(|e| Status::from(Error::Core(e)))?;
        match self.api.propose(Envelope::Alarm(r)).await? {
            ApplyResponse::Alarm(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(super::mismatched("alarm", &other)),
        }
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let replica = self.api.log.status();
        let mut resp = pb::StatusResponse {
            header: None,
            version: ETCD_API_VERSION.to_string(),
            db_size: self.api.engine.size() as i64,
            leader: replica.leader,
            raft_index: replica.commit_index,
            raft_term: replica.term,
            raft_applied_index: replica.applied_index,
            errors: Vec::new(),
            db_size_in_use: self.api.engine.size_in_use() as i64,
            is_learner: replica.is_learner,
            ..Default::default()
        };
        if replica.leader == 0 {
            resp.errors.push("etcdserver: no leader".to_string());
        }
        if let Ok(sm) = read_state(&self.api.state) {
            resp.errors.extend(sm.alarms().iter().map(alarm_text));
        }
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn hash(
        &self,
        _request: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.api.refuse_learner()?;
        let (hash, revision) = self
            .blocking(|api| {
                let sm = read_state(&api.state).map_err(Status::from)?;
                let hash = sm.hash().map_err(|e| Status::from(Error::Core(e)))?;
                Ok((hash, sm.current_revision()))
            })
            .await?;
        let mut resp = pb::HashResponse {
            header: Some(pb::ResponseHeader {
                revision,
                ..Default::default()
            }),
            hash,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.api.refuse_learner()?;
        let revision = request.into_inner().revision;
        let (h, current) = self
            .blocking(move |api| {
                let sm = read_state(&api.state).map_err(Status::from)?;
                let h = sm
                    .hash_kv(revision)
                    .map_err(|e| Status::from(Error::Core(e)))?;
                Ok((h, sm.current_revision()))
            })
            .await?;
        // etcd puts the store's current revision in the header, not the hashed one.
        let mut resp = pb::HashKvResponse {
            header: Some(pb::ResponseHeader {
                revision: current,
                ..Default::default()
            }),
            hash: h.hash,
            compact_revision: h.compact_revision,
            hash_revision: h.hash_revision,
        };
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// An alarm as etcd lists it in `StatusResponse.errors`: gogoproto's compact text form
/// of `AlarmMember` (`memberID:N alarm:NAME `, zero fields left out, a trailing space
/// after each field), which `etcdctl endpoint status` prints verbatim.
fn alarm_text(m: &pb::AlarmMember) -> String {
    let mut s = String::new();
    if m.member_id != 0 {
        s.push_str(&format!("memberID:{} ", m.member_id));
    }
    if m.alarm != 0 {
        match pb::AlarmType::try_from(m.alarm) {
            Ok(t) => s.push_str(&format!("alarm:{} ", t.as_str_name())),
            Err(_) => s.push_str(&format!("alarm:{} ", m.alarm)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_text_is_gogoproto_compact_text() {
        let m = pb::AlarmMember {
            member_id: 3319814642761637952,
            alarm: pb::AlarmType::Nospace as i32,
        };
        // Recorded from etcd 3.4.23's `endpoint status -w json`.
        assert_eq!(
            alarm_text(&m),
            "memberID:3319814642761637952 alarm:NOSPACE "
        );
        let m = pb::AlarmMember {
            member_id: 0,
            alarm: pb::AlarmType::Corrupt as i32,
        };
        assert_eq!(alarm_text(&m), "alarm:CORRUPT ");
    }
}
