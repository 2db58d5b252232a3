//! etcd's Maintenance service: what one member can already answer (Status, Hash, HashKV,
//! listing alarms). Everything else answers `Unimplemented` through the generated
//! defaults.
//!
//! This module owns the shape of Status and the hashing calls. It must never hash or size
//! anything itself: hashes are core's (so every engine and member agrees), sizes are the
//! engine's.

use std::sync::Arc;

use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use tonic::{Request, Response, Status};

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
        tokio::task::spawn_blocking(move || f(&api))
            .await
            .map_err(|e| Status::from(Error::Internal(format!("hash task failed: {e}"))))?
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
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

    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        if r.action != pb::alarm_request::AlarmAction::Get as i32 {
            return Err(Status::unimplemented(
                "etcdserver: activating and deactivating alarms is not implemented yet",
            ));
        }
        // No alarm can be raised yet (the space quota refuses writes without persisting
        // a NOSPACE alarm), so the list is empty.
        let mut resp = pb::AlarmResponse::default();
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
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
