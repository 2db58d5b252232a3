//! History checkers: judge a [`History`](crate::history::History) that simulated clients
//! recorded against etcd v3's guarantees, and report a violation as a minimal,
//! human-readable excerpt of the offending records.
//!
//! - [`linearizability`]: every key's KV operations have a linearization that a
//!   sequential etcd key would accept ([`check_linearizable`]), and revisions respect
//!   real time across keys ([`check_revision_order`]).
//! - [`lease`]: lease keys do not disappear before their lease could have expired, and
//!   are gone once it is known gone ([`check_leases`]); after the heal, keys of leases
//!   long unrenewed are gone ([`check_lease_expiry`]).
//! - [`watch`]: watch streams are ordered, gap-free, agree with each other and with the
//!   KV history ([`check_watches`]).
//!
//! This module only reads histories. It must never panic on any input (odd histories
//! are violations or are ignored, never `unwrap`ped), never look at a member's state
//! behind the API, and never report a violation that a correct etcd could produce:
//! a false alarm costs more than a missed bug, because the simulation replays seeds by
//! the thousand.

pub mod lease;
pub mod linearizability;
pub mod resolve;
pub mod watch;

use std::fmt;

use crate::history::{KvRecord, Versioned, WatchEnd, WatchRecord, WatchedEvent};

pub use lease::{check_lease_expiry, check_leases};
pub use linearizability::{check_linearizable, check_revision_order, LinearizabilityResult, Model};
pub use watch::check_watches;

/// Which check found a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Linearizability,
    RevisionOrder,
    Watch,
    Lease,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Linearizability => "linearizability",
            CheckKind::RevisionOrder => "revision order",
            CheckKind::Watch => "watch",
            CheckKind::Lease => "lease",
        })
    }
}

/// A violation of a guarantee: what is wrong, and the smallest part of the history that
/// shows it, grouped in titled sections. `Display` renders it for a test failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub check: CheckKind,
    /// The key the violation is about, when there is one.
    pub key: Option<Vec<u8>>,
    /// One sentence (possibly a few) saying what is wrong.
    pub message: String,
    pub sections: Vec<Section>,
}

/// A titled excerpt of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub title: String,
    pub kv: Vec<KvRecord>,
    pub watch: Vec<WatchExcerpt>,
}

impl Section {
    pub fn kv(title: impl Into<String>, kv: Vec<KvRecord>) -> Self {
        Self {
            title: title.into(),
            kv,
            watch: Vec::new(),
        }
    }

    pub fn watch(title: impl Into<String>, watch: Vec<WatchExcerpt>) -> Self {
        Self {
            title: title.into(),
            kv: Vec::new(),
            watch,
        }
    }
}

impl Violation {
    pub fn new(check: CheckKind, key: Option<&[u8]>, message: impl Into<String>) -> Self {
        Self {
            check,
            key: key.map(<[u8]>::to_vec),
            message: message.into(),
            sections: Vec::new(),
        }
    }

    pub fn with(mut self, section: Section) -> Self {
        if !section.kv.is_empty() || !section.watch.is_empty() {
            self.sections.push(section);
        }
        self
    }

    /// Every KV record the report shows.
    pub fn kv_records(&self) -> impl Iterator<Item = &KvRecord> {
        self.sections.iter().flat_map(|s| s.kv.iter())
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violation", self.check)?;
        if let Some(key) = &self.key {
            write!(f, " on key {}", show_bytes(key))?;
        }
        write!(f, ": {}", self.message)?;
        for section in &self.sections {
            write!(f, "\n  {}:", section.title)?;
            for record in &section.kv {
                write!(f, "\n    {record}")?;
            }
            for excerpt in &section.watch {
                write!(f, "\n    {excerpt}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// One watch stream, or one of its responses, as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchExcerpt {
    /// Index of the record in `History::watches`.
    pub record: usize,
    pub watcher: usize,
    pub member: usize,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub first_revision: i64,
    pub prev_kv: bool,
    pub end: WatchEnd,
    /// `Some((index, header revision))` when the excerpt is one response; its events
    /// are then that response's events, else the events the check is about.
    pub response: Option<(usize, i64)>,
    pub events: Vec<WatchedEvent>,
}

impl WatchExcerpt {
    /// The whole stream without events.
    pub fn stream(index: usize, record: &WatchRecord) -> Self {
        Self {
            record: index,
            watcher: record.watcher,
            member: record.member,
            key: record.key.clone(),
            range_end: record.range_end.clone(),
            first_revision: record.first_revision(),
            prev_kv: record.prev_kv,
            end: record.end.clone(),
            response: None,
            events: Vec::new(),
        }
    }

    /// One response of the stream (an out-of-range index gives no events).
    pub fn response(index: usize, record: &WatchRecord, response: usize) -> Self {
        let mut excerpt = Self::stream(index, record);
        if let Some((header, events)) = record.responses.get(response) {
            excerpt.response = Some((response, *header));
            excerpt.events = events.clone();
        }
        excerpt
    }

    pub fn with_events(mut self, events: Vec<WatchedEvent>) -> Self {
        self.events = events;
        self
    }
}

impl fmt::Display for WatchExcerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = if self.range_end.is_empty() {
            show_bytes(&self.key)
        } else if self.range_end == [0] {
            format!("[{}, end)", show_bytes(&self.key))
        } else {
            format!(
                "[{}, {})",
                show_bytes(&self.key),
                show_bytes(&self.range_end)
            )
        };
        write!(
            f,
            "watch #{} (watcher {} @ member {}, {range} from rev {}{}, {:?})",
            self.record,
            self.watcher,
            self.member,
            self.first_revision,
            if self.prev_kv { ", prev_kv" } else { "" },
            self.end
        )?;
        if let Some((index, header)) = self.response {
            write!(f, " response {index} (header rev {header})")?;
        }
        if !self.events.is_empty() {
            f.write_str(":")?;
            for (i, event) in self.events.iter().enumerate() {
                let sep = if i == 0 { " " } else { "; " };
                write!(f, "{sep}{}", show_event(event))?;
            }
        }
        Ok(())
    }
}

pub(crate) fn show_bytes(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) fn show_versioned(v: Option<&Versioned>) -> String {
    match v {
        None => "none".into(),
        Some(v) => format!("{}@{}", show_bytes(&v.value), v.mod_revision),
    }
}

/// `put k=v@rev (prev p@m)` or `delete k@rev`.
pub(crate) fn show_event(e: &WatchedEvent) -> String {
    let mut s = if e.deleted {
        format!("delete {}@{}", show_bytes(&e.key), e.revision)
    } else {
        format!(
            "put {}={}@{}",
            show_bytes(&e.key),
            show_bytes(&e.value),
            e.revision
        )
    };
    if let Some(prev) = &e.prev {
        s.push_str(&format!(" (prev {})", show_versioned(Some(prev))));
    }
    s
}
