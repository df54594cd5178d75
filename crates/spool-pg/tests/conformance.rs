//! The broker conformance suite (`spool_broker::conformance`) against the
//! PostgreSQL broker: every case, each on a fresh database of a private
//! cluster this test process starts (see `spool_pg::testing`), with a
//! manual clock.

use spool_broker::conformance::Harness;
use spool_pg::testing::TestCluster;
use spool_pg::{Clock, PgBroker, PgConfig};

/// 2026-12-04T00:00:00Z in nanoseconds since the Unix epoch.
const START_NS: u64 = 1_796_342_400_000_000_000;

/// Connections per test's broker: the suite's cases run in parallel.
const POOL_SIZE: usize = 4;

/// One node per test; a restart is the same node coming back.
const NODE_ID: &str = "conformance-node";

#[derive(Debug)]
struct PgHarness {
    broker: PgBroker,
    url: String,
}

async fn connect(url: &str, now_ns: u64) -> PgBroker {
    let mut config = PgConfig::new(url, NODE_ID);
    config.pool_size = POOL_SIZE;
    config.max_job_size = 1 << 16;
    PgBroker::connect(config, Clock::manual(now_ns))
        .await
        .unwrap_or_else(|e| panic!("connect to the test database: {e}"))
}

async fn fresh() -> PgHarness {
    let url = TestCluster::shared().create_database();
    PgHarness {
        broker: connect(&url, START_NS).await,
        url,
    }
}

impl Harness for PgHarness {
    type Broker = PgBroker;

    fn broker(&self) -> &PgBroker {
        &self.broker
    }

    async fn advance(&self, ms: u64) {
        self.broker
            .advance_clock(ms * 1_000_000)
            .await
            .expect("the timers run");
    }

    async fn restart(self) -> Option<PgHarness> {
        let now = self.broker.clock().now_ns();
        let PgHarness { broker, url } = self;
        drop(broker);
        Some(PgHarness {
            broker: connect(&url, now + 1_000_000).await,
            url,
        })
    }
}

spool_broker::conformance_tests!(fresh());
