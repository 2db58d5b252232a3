//! The raft log's writer: makes each `Ready`'s entries and hard state durable off the raft
//! loop, so the loop proposes, applies and answers while the disk syncs (raft-rs's
//! asynchronous `Ready`: `advance_append_async`, then `on_persist_ready` when this writer
//! reports back).
//!
//! This module owns the order in which the raft loop's writes reach the engine. It must
//! never reorder them (a job is written after every job submitted before it, several
//! queued jobs go out as one engine write), never report a `Ready` persisted before its
//! write and every earlier one have returned, never send a message that may only leave
//! after its `Ready` is durable (a follower's append acknowledgement, a vote) before that
//! nor before the report (the raft loop drains reports before it asks for a `Ready`),
//! and never write again after a failed write (the member stops; what raft holds in memory
//! may then be ahead of the disk).
//!
//! In production the writer is a thread of its own blocking on its queue (a hand-off to
//! tokio's blocking pool per write costs a wake-up each way); under simulation, where
//! threads are refused, it is a task.

use metastore_core::{Backend, WriteBatch};
use raft::eraftpb::Message;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use super::transport::Transport;

/// What the writer is asked to do, in order.
pub(super) struct Job {
    /// The `Ready` whose write this is, reported back once durable (none for writes raft
    /// does not wait for, such as a log compaction's deletes).
    number: Option<u64>,
    batch: WriteBatch,
    /// Messages that may leave only once this job is durable.
    messages: Vec<Message>,
    /// Answered once this job and every earlier one are written.
    barrier: Option<oneshot::Sender<()>>,
}

/// What the writer tells the raft loop.
pub(super) enum Report {
    /// Every job up to the one for this `Ready` number is durable.
    Persisted(u64),
    /// A write failed; nothing after it was written.
    Failed(String),
}

/// The raft loop's handle on its writer.
pub(super) struct Persister {
    jobs: mpsc::UnboundedSender<Job>,
    /// The newest `Ready` number submitted, and the newest reported persisted.
    submitted: u64,
    persisted: u64,
}

/// Jobs merged into one engine write stop growing past this many operations (a merged
/// write is as large as the backlog of a slow disk, and one huge write would hold back
/// the reports of every `Ready` in it).
const MAX_MERGED_OPS: usize = 16_384;

impl Persister {
    /// Starts the writer over `engine`. Its reports arrive on the returned receiver; the
    /// queue itself is unbounded, because every job carries entries raft already holds in
    /// memory until they are persisted (the backlog is bounded by the proposals in
    /// flight, which the clients' request timeouts bound).
    pub fn start(
        engine: Arc<dyn Backend>,
        transport: Transport,
    ) -> std::io::Result<(Self, mpsc::UnboundedReceiver<Report>)> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let (reports, reported) = mpsc::unbounded_channel();
        let writer = Writer {
            engine,
            transport,
            queue,
            reports,
        };
        #[cfg(not(madsim))]
        std::thread::Builder::new()
            .name("raft-persist".into())
            .spawn(move || writer.run_blocking())?;
        #[cfg(madsim)]
        tokio::spawn(writer.run_async());
        Ok((
            Self {
                jobs,
                submitted: 0,
                persisted: 0,
            },
            reported,
        ))
    }

    /// Queues the write of the `Ready` numbered `number` and the messages that must wait
    /// for it.
    pub fn submit(&mut self, number: u64, batch: WriteBatch, messages: Vec<Message>) {
        self.submitted = number;
        self.send(Job {
            number: Some(number),
            batch,
            messages,
            barrier: None,
        });
    }

    /// Queues a write that no `Ready` waits for, behind every write queued before it.
    pub fn submit_unnumbered(&mut self, batch: WriteBatch) {
        self.send(Job {
            number: None,
            batch,
            messages: Vec::new(),
            barrier: None,
        });
    }

    fn send(&self, job: Job) {
        // A writer that stopped after a failure has reported it; the loop stops on that
        // report, so a job sent meanwhile is dropped unwritten, as it should be.
        let _ = self.jobs.send(job);
    }

    /// Notes a report from the writer; returns whether every submitted job is durable.
    pub fn persisted(&mut self, number: u64) -> bool {
        self.persisted = self.persisted.max(number);
        self.drained()
    }

    /// Whether every submitted job is durable.
    pub fn drained(&self) -> bool {
        self.persisted >= self.submitted
    }

    /// Waits until every job submitted so far is written (or the writer stopped).
    pub async fn barrier(&mut self) {
        let (done, written) = oneshot::channel();
        self.send(Job {
            number: None,
            batch: WriteBatch::new(),
            messages: Vec::new(),
            barrier: Some(done),
        });
        // A dropped answer means the writer stopped after a failure it reported.
        let _ = written.await;
        self.persisted = self.submitted;
    }
}

struct Writer {
    engine: Arc<dyn Backend>,
    transport: Transport,
    queue: mpsc::UnboundedReceiver<Job>,
    reports: mpsc::UnboundedSender<Report>,
}

impl Writer {
    #[cfg(not(madsim))]
    fn run_blocking(mut self) {
        while let Some(job) = self.queue.blocking_recv() {
            if !self.write(job) {
                break;
            }
        }
    }

    #[cfg(madsim)]
    async fn run_async(mut self) {
        while let Some(job) = self.queue.recv().await {
            if !self.write(job) {
                break;
            }
        }
    }

    /// Writes `first` and whatever queued behind it as one engine write, then lets the
    /// waiting messages go and reports. Returns false after a failure.
    fn write(&mut self, first: Job) -> bool {
        let mut batch = first.batch;
        let mut messages = first.messages;
        let mut number = first.number;
        let mut barriers: Vec<_> = first.barrier.into_iter().collect();
        while batch.ops.len() < MAX_MERGED_OPS {
            let Ok(next) = self.queue.try_recv() else {
                break;
            };
            merge(&mut batch, next.batch);
            messages.extend(next.messages);
            number = next.number.or(number);
            barriers.extend(next.barrier);
        }
        if !batch.is_empty() {
            if let Err(e) = self.engine.write(batch) {
                let _ = self
                    .reports
                    .send(Report::Failed(format!("persisting raft entries: {e}")));
                return false;
            }
        }
        // The report goes before the messages: an answer to one of them (a vote that
        // makes this member leader) must not reach the raft loop before the news that
        // the Ready which sent it is durable (raft-rs asserts that a new leader has no
        // Ready with entries still unpersisted).
        if let Some(number) = number {
            let _ = self.reports.send(Report::Persisted(number));
        }
        self.transport.send(messages);
        for done in barriers {
            let _ = done.send(());
        }
        true
    }
}

/// Appends `next` to `batch`: one atomic write, synced if either was, and volatile only if
/// both were (a logged write must not lose its WAL record to a volatile neighbour).
fn merge(batch: &mut WriteBatch, next: WriteBatch) {
    if next.is_empty() {
        return;
    }
    if batch.is_empty() {
        *batch = next;
        return;
    }
    batch.ops.extend(next.ops);
    batch.sync |= next.sync;
    batch.volatile &= next.volatile;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use metastore_core::{BatchOp, Bucket, MemoryBackend};

    use super::super::tests::Counting;
    use super::*;

    fn batch(key: &[u8], sync: bool, volatile: bool) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.put(Bucket::Log, key.to_vec(), b"v".to_vec());
        b.sync = sync;
        b.volatile = volatile;
        b
    }

    #[test]
    fn merged_writes_keep_order_and_the_strongest_durability() {
        let mut b = WriteBatch::new();
        merge(&mut b, batch(b"a", false, true));
        assert!(b.volatile && !b.sync);
        merge(&mut b, batch(b"b", true, false));
        assert!(b.sync && !b.volatile);
        merge(&mut b, batch(b"c", false, true));
        assert!(b.sync && !b.volatile);
        let keys: Vec<_> = b
            .ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, .. } => key.clone(),
                BatchOp::Delete { key, .. } => key.clone(),
            })
            .collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        // A logged write merged with a volatile one stays logged.
        let mut b = batch(b"x", false, false);
        merge(&mut b, batch(b"y", false, true));
        assert!(!b.volatile && !b.sync);
    }

    #[tokio::test]
    async fn reports_come_in_order_after_the_writes() {
        let engine = Arc::new(MemoryBackend::new());
        let (inbox, _) = mpsc::channel(1);
        let transport = Transport::new(1, 1, inbox);
        let (mut persister, mut reports) = Persister::start(engine.clone(), transport).unwrap();
        for n in 1..=50u64 {
            persister.submit(n, batch(&n.to_be_bytes(), n % 2 == 0, false), Vec::new());
        }
        persister.submit_unnumbered(batch(b"last", false, false));
        persister.barrier().await;
        assert!(persister.drained());
        let mut last = 0;
        while let Ok(Report::Persisted(n)) = reports.try_recv() {
            assert!(n > last, "report {n} after {last}");
            // Everything up to the reported job is in the engine.
            assert!(engine.get(Bucket::Log, &n.to_be_bytes()).unwrap().is_some());
            last = n;
        }
        assert_eq!(last, 50);
        assert!(engine.get(Bucket::Log, b"last").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_and_nothing_after_it_is_written() {
        let engine = Counting::default();
        let (inbox, _) = mpsc::channel(1);
        let (mut persister, mut reports) =
            Persister::start(Arc::new(engine.clone()), Transport::new(1, 1, inbox)).unwrap();
        persister.submit(1, batch(b"ok", true, false), Vec::new());
        persister.barrier().await;
        engine.fail.store(true, Ordering::SeqCst);
        persister.submit(2, batch(b"bad", true, false), Vec::new());
        persister.submit(3, batch(b"after", true, false), Vec::new());
        // The barrier behind the failure is never answered: it resolves as dropped.
        persister.barrier().await;
        assert!(matches!(reports.recv().await, Some(Report::Persisted(1))));
        assert!(
            matches!(reports.recv().await, Some(Report::Failed(why)) if why.contains("injected"))
        );
        // The writer is gone: the channel ends, and nothing after the failure landed.
        assert!(reports.recv().await.is_none());
        assert!(engine.get(Bucket::Log, b"ok").unwrap().is_some());
        assert!(engine.get(Bucket::Log, b"after").unwrap().is_none());
    }
}
