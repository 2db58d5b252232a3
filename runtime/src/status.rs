//! The one place where failures become gRPC statuses: etcd's exact codes and messages.
//!
//! Clients (Go `clientv3`, etcdctl, `etcd-client`) recognise server errors by their
//! message text and gRPC code, so every client-visible error must be rendered here from
//! the table below, which follows etcd 3.5's `api/v3rpc/rpctypes/error.go` (plus
//! "invalid sort option", which etcd only names from 3.6 on). Nothing else in the runtime
//! may build a `tonic::Status` from free text for an etcd error.

use tonic::{Code, Status};

use crate::error::Error;

macro_rules! etcd_errors {
    ($($variant:ident => $code:ident, $msg:literal;)*) => {
        /// etcd's server-side gRPC errors (`rpctypes.ErrGRPC*`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum EtcdError {
            $($variant,)*
        }

        impl EtcdError {
            /// Every error, in etcd's declaration order.
            pub const ALL: &'static [EtcdError] = &[$(EtcdError::$variant,)*];

            /// The gRPC code etcd sends.
            pub fn code(self) -> Code {
                match self {
                    $(EtcdError::$variant => Code::$code,)*
                }
            }

            /// The message etcd sends, `etcdserver: ` prefix included.
            pub fn message(self) -> &'static str {
                match self {
                    $(EtcdError::$variant => $msg,)*
                }
            }
        }
    };
}

etcd_errors! {
    EmptyKey => InvalidArgument, "etcdserver: key is not provided";
    KeyNotFound => InvalidArgument, "etcdserver: key not found";
    ValueProvided => InvalidArgument, "etcdserver: value is provided";
    LeaseProvided => InvalidArgument, "etcdserver: lease is provided";
    TooManyOps => InvalidArgument, "etcdserver: too many operations in txn request";
    DuplicateKey => InvalidArgument, "etcdserver: duplicate key given in txn request";
    InvalidSortOption => InvalidArgument, "etcdserver: invalid sort option";
    Compacted => OutOfRange, "etcdserver: mvcc: required revision has been compacted";
    FutureRev => OutOfRange, "etcdserver: mvcc: required revision is a future revision";
    NoSpace => ResourceExhausted, "etcdserver: mvcc: database space exceeded";

    LeaseNotFound => NotFound, "etcdserver: requested lease not found";
    LeaseExist => FailedPrecondition, "etcdserver: lease already exists";
    LeaseTtlTooLarge => OutOfRange, "etcdserver: too large lease TTL";

    WatchCanceled => Cancelled, "etcdserver: watch canceled";

    MemberExist => FailedPrecondition, "etcdserver: member ID already exist";
    PeerUrlExist => FailedPrecondition, "etcdserver: Peer URLs already exists";
    MemberNotEnoughStarted => FailedPrecondition, "etcdserver: re-configuration failed due to not enough started members";
    MemberBadUrls => InvalidArgument, "etcdserver: given member URLs are invalid";
    MemberNotFound => NotFound, "etcdserver: member not found";
    MemberNotLearner => FailedPrecondition, "etcdserver: can only promote a learner member";
    LearnerNotReady => FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader";
    TooManyLearners => FailedPrecondition, "etcdserver: too many learner members in cluster";
    ClusterIdMismatch => FailedPrecondition, "etcdserver: cluster ID mismatch";

    RequestTooLarge => InvalidArgument, "etcdserver: request is too large";
    TooManyRequests => ResourceExhausted, "etcdserver: too many requests";

    RootUserNotExist => FailedPrecondition, "etcdserver: root user does not exist";
    RootRoleNotExist => FailedPrecondition, "etcdserver: root user does not have root role";
    UserAlreadyExist => FailedPrecondition, "etcdserver: user name already exists";
    UserEmpty => InvalidArgument, "etcdserver: user name is empty";
    UserNotFound => FailedPrecondition, "etcdserver: user name not found";
    RoleAlreadyExist => FailedPrecondition, "etcdserver: role name already exists";
    RoleNotFound => FailedPrecondition, "etcdserver: role name not found";
    RoleEmpty => InvalidArgument, "etcdserver: role name is empty";
    AuthFailed => InvalidArgument, "etcdserver: authentication failed, invalid user ID or password";
    PermissionNotGiven => InvalidArgument, "etcdserver: permission not given";
    PermissionDenied => PermissionDenied, "etcdserver: permission denied";
    RoleNotGranted => FailedPrecondition, "etcdserver: role is not granted to the user";
    PermissionNotGranted => FailedPrecondition, "etcdserver: permission is not granted to the role";
    AuthNotEnabled => FailedPrecondition, "etcdserver: authentication is not enabled";
    InvalidAuthToken => Unauthenticated, "etcdserver: invalid auth token";
    InvalidAuthMgmt => InvalidArgument, "etcdserver: invalid auth management";
    AuthOldRevision => InvalidArgument, "etcdserver: revision of auth store is old";

    NoLeader => Unavailable, "etcdserver: no leader";
    NotLeader => FailedPrecondition, "etcdserver: not leader";
    LeaderChanged => Unavailable, "etcdserver: leader changed";
    NotCapable => Unavailable, "etcdserver: not capable";
    Stopped => Unavailable, "etcdserver: server stopped";
    Timeout => Unavailable, "etcdserver: request timed out";
    TimeoutDueToLeaderFail => Unavailable, "etcdserver: request timed out, possibly due to previous leader failure";
    TimeoutDueToConnectionLost => Unavailable, "etcdserver: request timed out, possibly due to connection lost";
    TimeoutLeaderTransfer => Unavailable, "etcdserver: request timed out, leader transfer took too long";
    TimeoutWaitAppliedIndex => Unavailable, "etcdserver: request timed out, waiting for the applied index took too long";
    Unhealthy => Unavailable, "etcdserver: unhealthy cluster";
    Corrupt => DataLoss, "etcdserver: corrupt cluster";
    NotSupportedForLearner => Unavailable, "etcdserver: rpc not supported for learner";
    BadLeaderTransferee => FailedPrecondition, "etcdserver: bad leader transferee";

    ClusterVersionUnavailable => Unavailable, "etcdserver: cluster version not found during downgrade";
    WrongDowngradeVersionFormat => InvalidArgument, "etcdserver: wrong downgrade target version format";
    InvalidDowngradeTargetVersion => InvalidArgument, "etcdserver: invalid downgrade target version";
    DowngradeInProcess => FailedPrecondition, "etcdserver: cluster has a downgrade job in progress";
    NoInflightDowngrade => FailedPrecondition, "etcdserver: no inflight downgrade job";

    Canceled => Cancelled, "etcdserver: request canceled";
    DeadlineExceeded => DeadlineExceeded, "etcdserver: context deadline exceeded";
}

impl EtcdError {
    pub fn status(self) -> Status {
        Status::new(self.code(), self.message())
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        e.status()
    }
}

/// The etcd error a state-machine error is, if it is one of etcd's.
pub fn etcd_error_of(err: &metastore_core::Error) -> Option<EtcdError> {
    use metastore_core::Error as C;
    Some(match err {
        C::EmptyKey => EtcdError::EmptyKey,
        C::KeyNotFound => EtcdError::KeyNotFound,
        C::ValueProvided => EtcdError::ValueProvided,
        C::LeaseProvided => EtcdError::LeaseProvided,
        C::TooManyOps => EtcdError::TooManyOps,
        C::DuplicateKey => EtcdError::DuplicateKey,
        C::InvalidSortOption => EtcdError::InvalidSortOption,
        C::Compacted => EtcdError::Compacted,
        C::FutureRevision => EtcdError::FutureRev,
        C::NoSpace => EtcdError::NoSpace,
        C::LeaseNotFound => EtcdError::LeaseNotFound,
        C::LeaseExists => EtcdError::LeaseExist,
        C::LeaseTtlTooLarge => EtcdError::LeaseTtlTooLarge,
        C::RequestTooLarge => EtcdError::RequestTooLarge,
        C::MemberExists => EtcdError::MemberExist,
        C::PeerUrlExists => EtcdError::PeerUrlExist,
        C::MemberNotFound => EtcdError::MemberNotFound,
        C::MemberNotLearner => EtcdError::MemberNotLearner,
        C::TooManyLearners => EtcdError::TooManyLearners,
        C::CorruptAlarm => EtcdError::Corrupt,
        C::InvalidAlarm(_)
        | C::AlreadyApplied { .. }
        | C::Unimplemented(_)
        | C::MalformedRequest(_)
        | C::Backend(_)
        | C::Corrupt(_) => return None,
    })
}

/// Renders a runtime error as the status a client sees.
pub fn to_status(err: &Error) -> Status {
    use metastore_core::Error as C;
    match err {
        Error::Core(core) => match etcd_error_of(core) {
            Some(e) => e.status(),
            None => match core {
                C::Unimplemented(what) => {
                    Status::unimplemented(format!("etcdserver: {what} is not implemented yet"))
                }
                // etcd renders errors it has no gRPC mapping for as Unknown with the
                // error's own text (v3rpc `togRPCError`).
                C::MalformedRequest(_) | C::Backend(_) | C::AlreadyApplied { .. } => {
                    Status::unknown(format!("etcdserver: {core}"))
                }
                C::Corrupt(_) => EtcdError::Corrupt.status(),
                // etcd has no answer (it crashes on these); InvalidArgument names the
                // problem.
                C::InvalidAlarm(what) => Status::invalid_argument(format!("etcdserver: {what}")),
                _ => Status::unknown(format!("etcdserver: {core}")),
            },
        },
        Error::Stopped => EtcdError::Stopped.status(),
        Error::Timeout => EtcdError::Timeout.status(),
        // etcd has no gRPC mapping for a context error: the status is Unknown with Go's
        // text.
        Error::ProposalDeadline => Status::unknown("context deadline exceeded"),
        Error::Cluster(c) => {
            use crate::error::ClusterError as K;
            match c {
                K::NotLeader => EtcdError::NotLeader.status(),
                K::BadLeaderTransferee => EtcdError::BadLeaderTransferee.status(),
                K::LeaderTransferTimeout => EtcdError::TimeoutLeaderTransfer.status(),
                K::LearnerNotReady => EtcdError::LearnerNotReady.status(),
                K::NotEnoughStarted => EtcdError::MemberNotEnoughStarted.status(),
                K::NotSupportedForLearner => EtcdError::NotSupportedForLearner.status(),
                K::Removed => EtcdError::Stopped.status(),
            }
        }
        // grpc-go's own text (`rpc_util.go` recvMsg), which etcd clients see verbatim.
        Error::MessageTooLarge { len, max } => Status::resource_exhausted(format!(
            "grpc: received message larger than max ({len} vs. {max})"
        )),
        Error::Storage(_) | Error::Internal(_) => Status::unknown(format!("etcdserver: {err}")),
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_core::Error as C;

    fn row(code: Code, message: &str) -> String {
        format!("{:<18} {}", format!("{code:?}"), message)
    }

    #[test]
    fn etcd_error_table() {
        let table: Vec<String> = EtcdError::ALL
            .iter()
            .map(|e| format!("{:<30} {}", format!("{e:?}"), row(e.code(), e.message())))
            .collect();
        insta::assert_snapshot!(table.join("\n"));
    }

    #[test]
    fn core_errors_map_to_etcd_statuses() {
        let cases = [
            C::EmptyKey,
            C::KeyNotFound,
            C::ValueProvided,
            C::LeaseProvided,
            C::TooManyOps,
            C::DuplicateKey,
            C::InvalidSortOption,
            C::Compacted,
            C::FutureRevision,
            C::NoSpace,
            C::LeaseNotFound,
            C::LeaseExists,
            C::LeaseTtlTooLarge,
            C::RequestTooLarge,
            C::CorruptAlarm,
            C::InvalidAlarm("unknown alarm action 9".into()),
            C::Unimplemented("lease grant"),
            C::MalformedRequest("no request set".into()),
            C::Backend(metastore_core::BackendError("disk on fire".into())),
            C::Corrupt("index and data disagree".into()),
            C::AlreadyApplied {
                index: 3,
                applied: 5,
            },
        ];
        let table: Vec<String> = cases
            .into_iter()
            .map(|c| {
                let name = format!("{c:?}");
                let status = to_status(&Error::Core(c));
                format!("{:<60} {}", name, row(status.code(), status.message()))
            })
            .chain(
                [
                    Error::Stopped,
                    Error::Timeout,
                    Error::ProposalDeadline,
                    Error::Cluster(crate::error::ClusterError::NotLeader),
                    Error::Cluster(crate::error::ClusterError::BadLeaderTransferee),
                    Error::Cluster(crate::error::ClusterError::LearnerNotReady),
                    Error::Cluster(crate::error::ClusterError::NotSupportedForLearner),
                    Error::Storage("fsync failed".into()),
                    Error::MessageTooLarge {
                        len: 2_097_153,
                        max: 2_097_152,
                    },
                ]
                .iter()
                .map(|e| {
                    let status = to_status(e);
                    format!(
                        "{:<60} {}",
                        format!("{e:?}"),
                        row(status.code(), status.message())
                    )
                }),
            )
            .collect();
        insta::assert_snapshot!(table.join("\n"));
    }

    #[test]
    fn key_errors_are_exact() {
        // The ones clients match on most often, spelled out so a table edit cannot
        // silently change them.
        let s = to_status(&Error::Core(C::EmptyKey));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "etcdserver: key is not provided")
        );
        let s = to_status(&Error::Core(C::Compacted));
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            )
        );
        let s = to_status(&Error::Core(C::FutureRevision));
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision"
            )
        );
        let s = to_status(&Error::Core(C::NoSpace));
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded"
            )
        );
        let s = to_status(&Error::Core(C::LeaseNotFound));
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "etcdserver: requested lease not found")
        );
        let s = to_status(&Error::Core(C::RequestTooLarge));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "etcdserver: request is too large")
        );
    }
}
