//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact.
//!
//! This module owns the order of etcd's checks for each KV call (quota, then request
//! checks, then size at proposal) and the read-or-propose decision. It must never
//! evaluate a request itself: ranges and read-only transactions are core's reads, writes
//! are core's applies through the log.

use std::sync::Arc;

use metastore_core::ApplyResponse;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::etcdserverpb::kv_server::Kv;
use metastore_proto::metastore::internal_request::Request as Envelope;
use tonic::{Request, Response, Status};

use super::{cost_put, cost_txn, mismatched, precheck, txn_is_serializable, Api};
use crate::error::Error;

pub struct KvService {
    api: Arc<Api>,
}

impl KvService {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }
}

fn checked(result: metastore_core::Result<()>) -> Result<(), Status> {
    result.map_err(|e| Status::from(Error::Core(e)))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = request.into_inner();
        if !r.serializable {
            self.api.refuse_learner()?;
        }
        checked(precheck::range(&r))?;
        if !r.serializable {
            self.api.read_barrier().await?;
        }
        let mut resp = self.api.read(|sm| sm.range(&r))?;
        self.api.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        self.api.check_quota(cost_put(&r)).await?;
        checked(precheck::put(&r))?;
        match self.api.propose(Envelope::Put(r)).await? {
            ApplyResponse::Put(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("put", &other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        checked(precheck::delete_range(&r))?;
        match self.api.propose(Envelope::DeleteRange(r)).await? {
            ApplyResponse::DeleteRange(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("delete range", &other)),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        self.api.check_quota(cost_txn(&r)).await?;
        checked(precheck::txn(&r, self.api.limits.max_txn_ops))?;
        if precheck::is_txn_read_only(&r) {
            if !txn_is_serializable(&r) {
                self.api.read_barrier().await?;
            }
            let mut resp = self.api.read(|sm| sm.read_txn(&r))?;
            self.api.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        match self.api.propose(Envelope::Txn(r)).await? {
            ApplyResponse::Txn(mut resp) => {
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("txn", &other)),
        }
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        self.api.refuse_learner()?;
        let r = request.into_inner();
        match self.api.propose(Envelope::Compaction(r)).await? {
            ApplyResponse::Compaction(mut resp) => {
                // etcd reports the store's revision after the compaction in the header.
                resp.header.get_or_insert_with(Default::default).revision =
                    self.api.current_revision();
                self.api.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(mismatched("compact", &other)),
        }
    }
}
