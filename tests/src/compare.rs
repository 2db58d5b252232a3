//! Differential comparison: the same request sent to a real etcd and to the server under
//! test, answers compared field by field with the member-specific header fields
//! (cluster_id, member_id, raft_term) zeroed.

use std::fmt::Debug;

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::response_op::Response;
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, HashKvRequest,
    HashKvResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    TxnRequest, TxnResponse,
};
use tonic::transport::Channel;

use crate::server::{Kind, Server};

/// A gRPC error as the client sees it: code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcError {
    pub code: tonic::Code,
    pub message: String,
}

impl From<tonic::Status> for GrpcError {
    fn from(s: tonic::Status) -> Self {
        GrpcError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The answer to one call: a response or a gRPC error.
pub type Outcome<T> = Result<T, GrpcError>;

fn mask_header(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

/// Zeroes what legitimately differs between two single-member clusters.
pub trait Masked {
    fn masked(self) -> Self;
}

impl Masked for RangeResponse {
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self
    }
}
impl Masked for PutResponse {
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self
    }
}
impl Masked for DeleteRangeResponse {
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self
    }
}
impl Masked for CompactionResponse {
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self
    }
}
impl Masked for HashKvResponse {
    /// Also zeroes `hash_revision`: etcd 3.4 does not have that field (added in 3.5).
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self.hash_revision = 0;
        self
    }
}
impl Masked for TxnResponse {
    fn masked(mut self) -> Self {
        mask_header(&mut self.header);
        self.responses = self
            .responses
            .into_iter()
            .map(|mut r| {
                r.response = r.response.map(|x| match x {
                    Response::ResponseRange(v) => Response::ResponseRange(v.masked()),
                    Response::ResponsePut(v) => Response::ResponsePut(v.masked()),
                    Response::ResponseDeleteRange(v) => Response::ResponseDeleteRange(v.masked()),
                    Response::ResponseTxn(v) => Response::ResponseTxn(v.masked()),
                });
                r
            })
            .collect();
        self
    }
}

/// Replaces the digits after `cluster_id: `, `member_id: ` and `raft_term: ` in a Debug
/// rendering (used to compare `etcd-client` responses, whose fields are private).
pub fn mask_debug(s: &str) -> String {
    let mut out = s.to_string();
    for field in ["cluster_id: ", "member_id: ", "raft_term: "] {
        let mut res = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(field) {
            res.push_str(&rest[..i + field.len()]);
            rest = &rest[i + field.len()..];
            let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
            res.push('_');
            rest = &rest[digits..];
        }
        res.push_str(rest);
        out = res;
    }
    out
}

/// Masks `cluster_id`, `member_id` and `raft_term` in etcdctl's `-w json` output (any
/// nesting), so that two servers' JSON answers can be compared.
pub fn mask_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "cluster_id" || k == "member_id" || k == "raft_term" {
                    *x = serde_json::Value::from(0);
                } else {
                    mask_json(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(mask_json),
        _ => {}
    }
}

/// Renders a byte string readably in failure messages.
pub fn show(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// A real etcd and the server under test, driven in lockstep.
pub struct Pair {
    pub etcd: Server,
    pub subject: Server,
    pub ekv: KvClient<Channel>,
    pub skv: KvClient<Channel>,
    pub emt: MaintenanceClient<Channel>,
    pub smt: MaintenanceClient<Channel>,
    /// Every difference found so far (request, etcd's answer, the subject's answer).
    pub mismatches: Vec<String>,
    /// Panic at the first difference instead of collecting them.
    pub fail_fast: bool,
    /// Number of calls compared.
    pub calls: usize,
}

fn outcome<T: Masked>(r: Result<tonic::Response<T>, tonic::Status>) -> Outcome<T> {
    r.map(|r| r.into_inner().masked()).map_err(GrpcError::from)
}

impl Pair {
    /// Starts a real etcd and the subject ([`Kind::subject`]) side by side.
    pub async fn start() -> Pair {
        Self::start_subject(Kind::subject()).await
    }

    pub async fn start_subject(kind: Kind) -> Pair {
        Self::start_with(kind, &[]).await
    }

    /// Both servers started with the same extra flags.
    pub async fn start_with(kind: Kind, extra_args: &[&str]) -> Pair {
        let (etcd, subject) = tokio::join!(
            Server::start_with(Kind::Etcd, extra_args),
            Server::start_with(kind, extra_args)
        );
        let ekv = etcd.kv().await;
        let skv = subject.kv().await;
        let emt = etcd.maintenance().await;
        let smt = subject.maintenance().await;
        Pair {
            etcd,
            subject,
            ekv,
            skv,
            emt,
            smt,
            mismatches: Vec::new(),
            fail_fast: false,
            calls: 0,
        }
    }

    /// Records (or, with `fail_fast`, panics on) a difference; returns etcd's answer.
    pub fn check<T: PartialEq + Debug>(
        &mut self,
        what: String,
        etcd: Outcome<T>,
        subject: Outcome<T>,
    ) -> Outcome<T> {
        self.calls += 1;
        if let Err(e) = &etcd {
            if matches!(e.code, tonic::Code::Unknown | tonic::Code::Unavailable) {
                panic!(
                    "the reference etcd failed on {what}: {e:?} (it crashes on some inputs; \
                     such requests cannot be compared)\n--- etcd log tail ---\n{}",
                    self.etcd.log_tail(3000)
                );
            }
        }
        if std::env::var_os("METASTORE_TESTS_VERBOSE").is_some() {
            eprintln!("CALL {what}\n  => {etcd:?}");
        }
        if etcd != subject {
            let msg = format!(
                "DIFFERENCE #{n} on {what}\n  etcd:      {etcd:?}\n  {label}: {subject:?}",
                n = self.mismatches.len() + 1,
                label = self.subject.kind.label(),
            );
            if self.fail_fast {
                panic!("{msg}");
            }
            eprintln!("{msg}");
            self.mismatches.push(msg);
        }
        etcd
    }

    /// Compares two already-rendered answers (etcdctl output, Debug strings, ...).
    pub fn check_text(&mut self, what: String, etcd: String, subject: String) -> String {
        let _ = self.check(what, Ok::<_, GrpcError>(etcd.clone()), Ok(subject));
        etcd
    }

    pub async fn range(&mut self, req: RangeRequest) -> Outcome<RangeResponse> {
        let what = format!("Range {req:?}");
        let (mut e, mut s) = (self.ekv.clone(), self.skv.clone());
        let re = outcome(crate::bounded(&what, e.range(req.clone())).await);
        let rs = outcome(crate::bounded(&what, s.range(req)).await);
        self.check(what, re, rs)
    }

    pub async fn put(&mut self, req: PutRequest) -> Outcome<PutResponse> {
        let what = format!("Put {}", describe_put(&req));
        let (mut e, mut s) = (self.ekv.clone(), self.skv.clone());
        let re = outcome(crate::bounded(&what, e.put(req.clone())).await);
        let rs = outcome(crate::bounded(&what, s.put(req)).await);
        self.check(what, re, rs)
    }

    pub async fn delete_range(&mut self, req: DeleteRangeRequest) -> Outcome<DeleteRangeResponse> {
        let what = format!("DeleteRange {req:?}");
        let (mut e, mut s) = (self.ekv.clone(), self.skv.clone());
        let re = outcome(crate::bounded(&what, e.delete_range(req.clone())).await);
        let rs = outcome(crate::bounded(&what, s.delete_range(req)).await);
        self.check(what, re, rs)
    }

    pub async fn txn(&mut self, req: TxnRequest) -> Outcome<TxnResponse> {
        let what = format!("Txn {}", describe_txn(&req));
        let (mut e, mut s) = (self.ekv.clone(), self.skv.clone());
        let re = outcome(crate::bounded(&what, e.txn(req.clone())).await);
        let rs = outcome(crate::bounded(&what, s.txn(req)).await);
        self.check(what, re, rs)
    }

    pub async fn compact(&mut self, req: CompactionRequest) -> Outcome<CompactionResponse> {
        let what = format!("Compact {req:?}");
        let (mut e, mut s) = (self.ekv.clone(), self.skv.clone());
        let re = outcome(crate::bounded(&what, e.compact(req)).await);
        let rs = outcome(crate::bounded(&what, s.compact(req)).await);
        self.check(what, re, rs)
    }

    pub async fn hash_kv(&mut self, revision: i64) -> Outcome<HashKvResponse> {
        let what = format!("HashKV {{ revision: {revision} }}");
        let req = HashKvRequest { revision };
        let (mut e, mut s) = (self.emt.clone(), self.smt.clone());
        let re = outcome(crate::bounded(&what, e.hash_kv(req)).await);
        let rs = outcome(crate::bounded(&what, s.hash_kv(req)).await);
        self.check(what, re, rs)
    }

    /// Panics listing every difference found, if any.
    pub fn finish(self) {
        if !self.mismatches.is_empty() {
            panic!(
                "{} difference(s) between etcd and {} in {} compared calls:\n\n{}",
                self.mismatches.len(),
                self.subject.kind.label(),
                self.calls,
                self.mismatches.join("\n\n")
            );
        }
    }
}

/// Shortens big values in request descriptions.
pub fn describe_put(r: &PutRequest) -> String {
    if r.value.len() > 64 {
        format!(
            "PutRequest {{ key: {}, value: <{} bytes>, lease: {}, prev_kv: {}, ignore_value: {}, ignore_lease: {} }}",
            show(&r.key),
            r.value.len(),
            r.lease,
            r.prev_kv,
            r.ignore_value,
            r.ignore_lease
        )
    } else {
        format!("{r:?}")
    }
}

/// Shortens huge transactions in request descriptions.
pub fn describe_txn(r: &TxnRequest) -> String {
    let s = format!("{r:?}");
    if s.len() > 2000 {
        format!(
            "TxnRequest {{ {} compares, {} success ops, {} failure ops: {}... }}",
            r.compare.len(),
            r.success.len(),
            r.failure.len(),
            &s[..500]
        )
    } else {
        s
    }
}
