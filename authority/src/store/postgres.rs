//! The shared store: PostgreSQL, for several authorities serving one cluster.
//!
//! Every [`Table`] lives in one SQL table `edgeport_kv (tbl, key, value)`; keys are BYTEA
//! and compare bytewise, as sled's do (any byte, NUL included, in any database encoding), so
//! prefix scans come back in the same order.
//! `compare_and_swap` is a conditional `INSERT`/`UPDATE`/`DELETE` whose row count says
//! whether it happened, which is all the handlers' read-modify-write loops need.
//!
//! The [`Store`] trait is synchronous (handlers run on the blocking pool), tokio-postgres is
//! not: the store owns one thread with its own small runtime that holds the connections, and
//! each call waits for that thread's answer. Nothing here ever starts or drops a runtime on a
//! caller's thread, so the store can be used and dropped anywhere.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::{Client, Config, Statement};

use super::postgres_tls::Rustls;

use super::{Store, StoreError, Table};

/// Connections kept to the database (the blocking pool runs at most this many queries at once).
const POOL: usize = 8;
/// One query (or connecting) may take at most this long before the caller gets an error.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Serialises schema creation between authorities starting at the same moment.
const SCHEMA_LOCK: i64 = 0x6564_6765_706f_7274; // "edgeport"

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS edgeport_kv (
    tbl   TEXT  NOT NULL,
    key   BYTEA NOT NULL,
    value BYTEA NOT NULL,
    PRIMARY KEY (tbl, key)
)";

/// Where the cluster that owns the database is recorded (not one of the handlers' tables).
const META: &str = "_meta";

pub struct PostgresStore {
    jobs: mpsc::UnboundedSender<Job>,
    /// The URL without its password, for messages.
    shown: String,
}

/// One statement for the store's thread; the answer goes back on `reply`.
struct Job {
    op: Op,
    reply: std_mpsc::SyncSender<Result<Answer, StoreError>>,
}

#[derive(Clone)]
enum Op {
    Get(Table, String),
    Put(Table, String, Vec<u8>),
    Delete(Table, String),
    Scan(Table, String),
    /// Prefix, first key, most rows.
    ScanFrom(Table, String, String, usize),
    Cas(Table, String, Option<Vec<u8>>, Option<Vec<u8>>),
    Claim {
        cluster: String,
        ca_pin: String,
    },
}

enum Answer {
    Value(Option<Vec<u8>>),
    Rows(Vec<(String, Vec<u8>)>),
    Swapped(bool),
    Done,
    Owner(String),
}

/// A connection with its statements prepared once.
struct Conn {
    client: Client,
    get: Statement,
    put: Statement,
    delete: Statement,
    scan: Statement,
    scan_all: Statement,
    scan_from: Statement,
    insert_new: Statement,
    update_if: Statement,
    delete_if: Statement,
}

/// Idle connections and the right to make a new one.
struct Pool {
    config: Config,
    tls: Rustls,
    /// Set once the table exists (made on the first connection).
    schema: tokio::sync::OnceCell<()>,
    idle: Mutex<Vec<Conn>>,
    slots: Semaphore,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("postgresql: {e}"))
}

/// tokio-postgres says only "db error" or "error connecting to server" at the top; the
/// server's message (or the socket error) is in the source chain.
fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return backend(format!("{} ({})", db.message(), db.code().code()));
    }
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    backend(msg)
}

/// `postgres://user:secret@host/db` -> `postgres://user@host/db` (also for key=value strings).
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            let user = auth.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}@{host}");
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db` or `host=... dbname=...`),
    /// creates the table if needed, and claims the database for `cluster` with the CA whose
    /// pin is `ca_pin`: an authority of another cluster (or with other CA keys) is refused,
    /// so two clusters can never share, and mix, one database by mistake.
    ///
    /// TLS: the server's certificate is verified against `tls_ca` (PEM) or the system's
    /// roots; `sslmode=require` in the URL refuses a server without TLS.
    pub fn open(
        url: &str,
        tls_ca: Option<&std::path::Path>,
        cluster: &str,
        ca_pin: &str,
    ) -> Result<Self, StoreError> {
        let shown = redact(url);
        let tls = Rustls::new(tls_ca)?;
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("bad PostgreSQL URL {shown}: {e}")))?;
        // libpq's default (`prefer`) lets anyone in the path answer "no TLS" and read the
        // password and every record: over the network TLS is required unless the URL says
        // otherwise (`sslmode=disable` for a private test database).
        let unix = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        if !unix && !url.contains("sslmode=") {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        let (jobs, rx) = mpsc::unbounded_channel();
        let pool = Arc::new(Pool {
            config,
            tls,
            schema: tokio::sync::OnceCell::new(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(POOL),
        });
        std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn(move || serve(pool, rx))
            .map_err(backend)?;
        let store = Self { jobs, shown };
        let owner = match store.call(Op::Claim {
            cluster: cluster.to_string(),
            ca_pin: ca_pin.to_string(),
        })? {
            Answer::Owner(o) => o,
            _ => return Err(backend("unexpected answer")),
        };
        let ours = owner_record(cluster, ca_pin);
        if owner != ours {
            return Err(StoreError::Backend(format!(
                "the database {} belongs to another cluster or CA ({owner}); this authority is \
                 {ours}. Several authorities of one cluster share the CA keys: copy DATA/ca \
                 from the first one",
                store.shown
            )));
        }
        tracing::info!(database = %store.shown, "store: PostgreSQL");
        Ok(store)
    }

    fn call(&self, op: Op) -> Result<Answer, StoreError> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.jobs
            .send(Job { op, reply })
            .map_err(|_| backend("the store's connection thread has stopped"))?;
        match answer.recv_timeout(QUERY_TIMEOUT + Duration::from_secs(5)) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Backend(format!(
                "postgresql at {} did not answer in time",
                self.shown
            ))),
        }
    }
}

fn owner_record(cluster: &str, ca_pin: &str) -> String {
    format!("cluster {cluster}, CA {ca_pin}")
}

/// The store's thread: a small runtime that runs each job as its own task.
fn serve(pool: Arc<Pool>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("store: cannot start the PostgreSQL runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        while let Some(job) = rx.recv().await {
            let pool = pool.clone();
            tokio::spawn(async move {
                let res = tokio::time::timeout(QUERY_TIMEOUT, run(&pool, job.op))
                    .await
                    .unwrap_or_else(|_| Err(backend("query timed out")));
                let _ = job.reply.send(res);
            });
        }
    });
}

/// Runs one operation on a pooled connection. A connection that fails is dropped (the next
/// operation makes a new one). An operation that found its connection closed (the server
/// restarted, or an administrator ended it) runs once more on a new one, unless it is a
/// conditional write: whether that one happened before the connection died is unknown, and
/// the caller's read-modify-write loop is the right place to find out.
async fn run(pool: &Pool, op: Op) -> Result<Answer, StoreError> {
    let _slot = pool.slots.acquire().await.map_err(backend)?;
    // A delete that may have happened would report "absent" the second time.
    let retry = (!matches!(op, Op::Cas(..) | Op::Delete(..))).then(|| op.clone());
    match run_once(pool, op).await {
        Err(Failure::Closed(_)) if retry.is_some() => match retry {
            Some(op) => run_once(pool, op).await.map_err(Failure::into_store),
            None => Err(backend("unreachable")),
        },
        r => r.map_err(Failure::into_store),
    }
}

enum Failure {
    /// The connection was closed under the operation.
    Closed(StoreError),
    Other(StoreError),
}

impl Failure {
    fn into_store(self) -> StoreError {
        match self {
            Failure::Closed(e) | Failure::Other(e) => e,
        }
    }
}

async fn run_once(pool: &Pool, op: Op) -> Result<Answer, Failure> {
    let idle = pool.idle.lock().ok().and_then(|mut v| v.pop());
    let conn = match idle {
        Some(c) if !c.client.is_closed() => c,
        _ => connect(pool).await.map_err(Failure::Other)?,
    };
    let res = execute(&conn, op).await;
    if conn.client.is_closed() {
        return res.map_err(Failure::Closed);
    }
    if let Ok(mut v) = pool.idle.lock() {
        v.push(conn);
    }
    res.map_err(Failure::Other)
}

async fn connect(pool: &Pool) -> Result<Conn, StoreError> {
    pool.schema.get_or_try_init(|| ensure_schema(pool)).await?;
    let (client, connection) = pool.config.connect(pool.tls.clone()).await.map_err(pg)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("store: PostgreSQL connection ended: {e}");
        }
    });
    let prep = |sql: &'static str| {
        let client = &client;
        async move { client.prepare(sql).await.map_err(pg) }
    };
    Ok(Conn {
        get: prep("SELECT value FROM edgeport_kv WHERE tbl = $1 AND key = $2").await?,
        put: prep(
            "INSERT INTO edgeport_kv (tbl, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
        )
        .await?,
        delete: prep("DELETE FROM edgeport_kv WHERE tbl = $1 AND key = $2 RETURNING value").await?,
        scan: prep(
            "SELECT key, value FROM edgeport_kv
             WHERE tbl = $1 AND key >= $2 AND key < $3 ORDER BY key",
        )
        .await?,
        scan_all: prep("SELECT key, value FROM edgeport_kv WHERE tbl = $1 ORDER BY key").await?,
        scan_from: prep(
            "SELECT key, value FROM edgeport_kv
             WHERE tbl = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4",
        )
        .await?,
        insert_new: prep(
            "INSERT INTO edgeport_kv (tbl, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (tbl, key) DO NOTHING",
        )
        .await?,
        update_if: prep(
            "UPDATE edgeport_kv SET value = $4 WHERE tbl = $1 AND key = $2 AND value = $3",
        )
        .await?,
        delete_if: prep("DELETE FROM edgeport_kv WHERE tbl = $1 AND key = $2 AND value = $3")
            .await?,
        client,
    })
}

/// Creates the table if it is missing (prepared statements need it), on a connection of its
/// own before the pool makes its first one.
async fn ensure_schema(pool: &Pool) -> Result<(), StoreError> {
    let (client, connection) = pool.config.connect(pool.tls.clone()).await.map_err(pg)?;
    let task = tokio::spawn(connection);
    let res = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg)?;
        // Quietly: "already exists, skipping" is the usual case, not news.
        client
            .batch_execute("SET client_min_messages TO warning")
            .await
            .map_err(pg)?;
        let made = client.batch_execute(SCHEMA).await.map_err(pg);
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
            .await;
        made
    }
    .await;
    drop(client);
    let _ = task.await;
    res
}

/// Above every key that starts with `prefix`: keys are UTF-8, which never holds the byte
/// 0xFF, so the prefix followed by it bounds them all (BYTEA compares bytewise, as sled).
fn upper_bound(prefix: &str) -> Vec<u8> {
    let mut b = prefix.as_bytes().to_vec();
    b.push(0xFF);
    b
}

fn rows_of(rows: &[tokio_postgres::Row]) -> Vec<(String, Vec<u8>)> {
    rows.iter()
        .map(|r| {
            let k: Vec<u8> = r.get(0);
            (
                String::from_utf8_lossy(&k).into_owned(),
                r.get::<_, Vec<u8>>(1),
            )
        })
        .collect()
}

async fn execute(c: &Conn, op: Op) -> Result<Answer, StoreError> {
    let cl = &c.client;
    Ok(match op {
        Op::Get(t, k) => Answer::Value(
            cl.query_opt(&c.get, &[&t.name(), &k.as_bytes()])
                .await
                .map_err(pg)?
                .map(|r| r.get::<_, Vec<u8>>(0)),
        ),
        Op::Put(t, k, v) => {
            cl.execute(&c.put, &[&t.name(), &k.as_bytes(), &v])
                .await
                .map_err(pg)?;
            Answer::Done
        }
        Op::Delete(t, k) => Answer::Value(
            cl.query_opt(&c.delete, &[&t.name(), &k.as_bytes()])
                .await
                .map_err(pg)?
                .map(|r| r.get::<_, Vec<u8>>(0)),
        ),
        Op::Scan(t, p) => {
            let rows = if p.is_empty() {
                cl.query(&c.scan_all, &[&t.name()]).await
            } else {
                cl.query(&c.scan, &[&t.name(), &p.as_bytes(), &upper_bound(&p)])
                    .await
            }
            .map_err(pg)?;
            Answer::Rows(rows_of(&rows))
        }
        Op::ScanFrom(t, p, from, limit) => {
            let start = if from > p { from } else { p.clone() };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = cl
                .query(
                    &c.scan_from,
                    &[&t.name(), &start.as_bytes(), &upper_bound(&p), &limit],
                )
                .await
                .map_err(pg)?;
            Answer::Rows(rows_of(&rows))
        }
        Op::Cas(t, k, expected, new) => {
            let n = t.name();
            let changed = match (expected, new) {
                (None, Some(v)) => cl.execute(&c.insert_new, &[&n, &k.as_bytes(), &v]).await,
                (Some(e), Some(v)) => cl.execute(&c.update_if, &[&n, &k.as_bytes(), &e, &v]).await,
                (Some(e), None) => cl.execute(&c.delete_if, &[&n, &k.as_bytes(), &e]).await,
                (None, None) => {
                    let absent = cl
                        .query_opt(&c.get, &[&n, &k.as_bytes()])
                        .await
                        .map_err(pg)?
                        .is_none();
                    return Ok(Answer::Swapped(absent));
                }
            }
            .map_err(pg)?;
            Answer::Swapped(changed == 1)
        }
        Op::Claim { cluster, ca_pin } => {
            let ours = owner_record(&cluster, &ca_pin).into_bytes();
            cl.execute(&c.insert_new, &[&META, &b"owner".as_slice(), &ours])
                .await
                .map_err(pg)?;
            let owner = cl
                .query_opt(&c.get, &[&META, &b"owner".as_slice()])
                .await
                .map_err(pg)?
                .map(|r| r.get::<_, Vec<u8>>(0))
                .unwrap_or_default();
            Answer::Owner(String::from_utf8_lossy(&owner).into_owned())
        }
    })
}

impl Store for PostgresStore {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Op::Get(table, key.to_string()))? {
            Answer::Value(v) => Ok(v),
            _ => Err(backend("unexpected answer")),
        }
    }

    fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.call(Op::Put(table, key.to_string(), value))
            .map(|_| ())
    }

    fn delete(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(Op::Delete(table, key.to_string()))? {
            Answer::Value(v) => Ok(v),
            _ => Err(backend("unexpected answer")),
        }
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self.call(Op::Scan(table, prefix.to_string()))? {
            Answer::Rows(r) => Ok(r),
            _ => Err(backend("unexpected answer")),
        }
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        match self.call(Op::ScanFrom(
            table,
            prefix.to_string(),
            from.to_string(),
            limit,
        ))? {
            Answer::Rows(r) => Ok(r),
            _ => Err(backend("unexpected answer")),
        }
    }

    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        match self.call(Op::Cas(
            table,
            key.to_string(),
            expected.map(<[u8]>::to_vec),
            new,
        ))? {
            Answer::Swapped(s) => Ok(s),
            _ => Err(backend("unexpected answer")),
        }
    }

    /// Every statement commits on its own, so there is nothing to flush.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("postgres://edgeport:s3cret@db.example:5432/edgeport"),
            "postgres://edgeport@db.example:5432/edgeport"
        );
        assert_eq!(
            redact("host=db user=e password=s3cret dbname=x"),
            "host=db user=e password=*** dbname=x"
        );
        assert_eq!(redact("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn upper_bound_is_above_every_key_with_the_prefix() {
        let ub = upper_bound("d/van-1/");
        for k in [
            "d/van-1/",
            "d/van-1/00000000000000000001",
            "d/van-1/zzz\u{10FFFF}",
        ] {
            assert!(k.as_bytes() < ub.as_slice(), "{k}");
        }
        // A longer id sorts after the whole range ('0' > '/').
        assert!("d/van-10".as_bytes() > ub.as_slice());
    }

    #[test]
    fn a_bad_url_is_an_error() {
        let Err(e) = PostgresStore::open("postgres://u:pw@[::1", None, "c", "p") else {
            unreachable!("a malformed URL opened")
        };
        let msg = e.to_string();
        assert!(msg.contains("bad PostgreSQL URL"), "{msg}");
        assert!(!msg.contains("pw"), "{msg}");
    }
}
