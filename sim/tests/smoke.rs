#![cfg(madsim)]
//! temporary smoke run while the harness is built

use std::time::Duration;

use metastore_sim::faults::FaultPlan;
use metastore_sim::run::{run, RunConfig};

#[madsim::test]
async fn smoke() {
    madsim::runtime::init_logger();
    let report = run(RunConfig {
        duration: Duration::from_secs(30),
        faults: FaultPlan {
            kinds: metastore_sim::faults::FaultKind::ALL.to_vec(),
            ..FaultPlan::default()
        },
        ..RunConfig::default()
    })
    .await;
    eprintln!(
        "ops {} watches {} final {} conv {:?} elapsed {:?}\n{}",
        report.history.kv.len(),
        report.history.watches.len(),
        report.final_revision,
        report.convergence,
        report.elapsed,
        report.faults
    );
    let indeterminate = report.history.kv.iter().filter(|r| r.outcome.is_none()).count();
    eprintln!("indeterminate {indeterminate}");
    for r in report.history.kv.iter().take(10) {
        eprintln!("{r}");
    }
    assert!(report.convergence.is_ok());
}
