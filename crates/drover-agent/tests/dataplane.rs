//! The agent's side of the pipeline data protocol, against real programs: the Python
//! SDK's example map and small Python sources and sinks, each a child process that
//! dials the task socket as a vertex replica's program does.

use async_trait::async_trait;
use drover_agent::dataplane::{Plane, PlaneConfig, PlaneCounters, Route};
use drover_agent::socket::{DataEndpoint, TaskFacts, TaskSocket};
use drover_buffer::{
    Appended, Buffer, BufferError, BufferName, BufferStats, Delivery, DeliveryTag, Message,
    MessageId,
};
use drover_core::pipeline::spec::TagCondition;
use drover_pipeline::proto::Role;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A buffer in memory with the trait's semantics (de-duplication, leases, nack), so
/// these tests exercise the agent and the programs; the buffer backends have their
/// own suite.
struct MemBuffer {
    name: BufferName,
    state: Mutex<MemState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct MemState {
    queue: VecDeque<(Message, u32)>,
    leased: HashMap<DeliveryTag, (Message, u32)>,
    seen: HashSet<MessageId>,
    next_tag: u64,
    stats: BufferStats,
}

impl MemBuffer {
    fn new(vertex: &str) -> Arc<MemBuffer> {
        Arc::new(MemBuffer {
            name: BufferName::new("default", "test", vertex, 0).unwrap(),
            state: Mutex::default(),
            ready: tokio::sync::Notify::new(),
        })
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        let s = self.state.lock().unwrap();
        s.queue.iter().map(|(m, _)| m.payload.to_vec()).collect()
    }

    fn held(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.queue.len(), s.leased.len())
    }
}

#[async_trait]
impl Buffer for MemBuffer {
    fn name(&self) -> &BufferName {
        &self.name
    }

    async fn append(&self, batch: &[Message]) -> Result<Appended, BufferError> {
        let mut s = self.state.lock().unwrap();
        let mut done = Appended::default();
        for m in batch {
            if s.seen.insert(m.id) {
                s.queue.push_back((m.clone(), 0));
                done.written += 1;
            } else {
                done.duplicates += 1;
            }
        }
        s.stats.duplicates_total += done.duplicates as u64;
        drop(s);
        self.ready.notify_waiters();
        Ok(done)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BufferError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            {
                let mut s = self.state.lock().unwrap();
                let mut out = Vec::new();
                while out.len() < max {
                    let Some((m, redeliveries)) = s.queue.pop_front() else {
                        break;
                    };
                    s.next_tag += 1;
                    let tag = DeliveryTag(s.next_tag);
                    s.leased.insert(tag, (m.clone(), redeliveries));
                    out.push(Delivery {
                        tag,
                        redeliveries,
                        message: m,
                    });
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        let mut s = self.state.lock().unwrap();
        for t in tags {
            if s.leased.remove(t).is_some() {
                s.stats.acked_total += 1;
            }
        }
        Ok(())
    }

    async fn nack(&self, tags: &[DeliveryTag], _delay: Duration) -> Result<(), BufferError> {
        let mut s = self.state.lock().unwrap();
        for t in tags {
            if let Some((m, r)) = s.leased.remove(t) {
                s.queue.push_back((m, r + 1));
            }
        }
        drop(s);
        self.ready.notify_waiters();
        Ok(())
    }

    async fn keep_alive(&self, _tags: &[DeliveryTag]) -> Result<(), BufferError> {
        Ok(())
    }

    async fn stats(&self) -> Result<BufferStats, BufferError> {
        let s = self.state.lock().unwrap();
        Ok(BufferStats {
            pending: s.queue.len() as u64,
            unacked: s.leased.len() as u64,
            ..s.stats
        })
    }
}

fn message(i: u64, payload: &str) -> Message {
    Message {
        id: MessageId(u128::from(i) + 1),
        key: bytes::Bytes::new(),
        event_time: 1_000 + i as i64,
        payload: bytes::Bytes::from(payload.to_string()),
    }
}

/// What the socket tells the replica's program about its task.
fn facts() -> TaskFacts {
    TaskFacts {
        task_id: "task-1".into(),
        job: "vertex".into(),
        job_id: "job-1".into(),
        project: "default".into(),
        index: 0,
        attempt: 0,
        config: None,
    }
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python")
}

/// A vertex replica: its task socket served with `plane`, and `program` (Python code,
/// or a file) run with `DROVER_SOCKET` pointing at it.
struct Replica {
    _dir: tempfile::TempDir,
    _socket: TaskSocket,
    child: tokio::process::Child,
}

impl Replica {
    fn start(role: Role, plane: Plane, program: Program) -> Replica {
        Replica::start_with(role, plane, program, &[])
    }

    /// [`Replica::start`] with more variables in the program's environment.
    fn start_with(role: Role, plane: Plane, program: Program, env: &[(&str, &Path)]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.sock");
        let endpoint = Arc::new(DataEndpoint { role, plane });
        let socket = TaskSocket::bind_with(&path, facts(), Some(endpoint)).unwrap();
        let mut cmd = tokio::process::Command::new("python3");
        match program {
            Program::File(f) => cmd.arg(f),
            Program::Code(code) => cmd.arg("-c").arg(code),
        };
        cmd.env("DROVER_SOCKET", &path)
            .env("PYTHONPATH", sdk_dir())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(env.iter().copied())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("python3 runs the SDK's programs");
        Replica {
            _dir: dir,
            _socket: socket,
            child,
        }
    }
}

enum Program {
    File(PathBuf),
    Code(&'static str),
}

fn plane(input: Option<Arc<MemBuffer>>, routes: Vec<Route>) -> Plane {
    Plane {
        input: input.map(|b| b as Arc<dyn Buffer>),
        routes,
        identity: "default/test/vertex".into(),
        config: PlaneConfig {
            max_batch: 64,
            answer_timeout: Duration::from_secs(2),
            ..PlaneConfig::default()
        },
        counters: Arc::new(PlaneCounters::default()),
    }
}

fn route(condition: Option<TagCondition>, to: &Arc<MemBuffer>) -> Route {
    Route {
        condition,
        partitions: vec![to.clone() as Arc<dyn Buffer>],
    }
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_python_map_upper_cases_every_message_and_tags_route_them() {
    let (input, upper, rest) = (
        MemBuffer::new("in"),
        MemBuffer::new("up"),
        MemBuffer::new("rest"),
    );
    let n = 1_000;
    let batch: Vec<Message> = (0..n)
        .map(|i| message(i, if i % 10 == 0 { "" } else { "hello" }))
        .collect();
    input.append(&batch).await.unwrap();
    let p = plane(
        Some(input.clone()),
        vec![
            route(Some(TagCondition::Any(vec!["upper".into()])), &upper),
            route(Some(TagCondition::NoneOf(vec!["upper".into()])), &rest),
        ],
    );
    let counters = p.counters.clone();
    let _replica = Replica::start(
        Role::Map,
        p,
        Program::File(sdk_dir().join("examples/upper_map.py")),
    );
    // The example drops empty messages and tags the rest "upper".
    until("every input acknowledged", || input.held() == (0, 0)).await;
    let out = upper.payloads();
    assert_eq!(out.len(), 900);
    assert!(out.iter().all(|p| p == b"HELLO"));
    assert!(
        rest.payloads().is_empty(),
        "untagged edge got tagged messages"
    );
    let c = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((c(&counters.read), c(&counters.acked)), (n, n));
    assert_eq!(c(&counters.written), 900);
    // Outputs carry ids derived from their inputs', so a second run of the same
    // inputs is dropped downstream instead of doubled.
    let dup = upper
        .append(&[Message {
            id: MessageId::derive(batch[1].id, 0),
            ..batch[1].clone()
        }])
        .await
        .unwrap();
    assert_eq!(dup.duplicates, 1);
}

#[tokio::test]
async fn a_python_source_reaches_the_buffer_once_per_record_and_hears_its_acks() {
    let out = MemBuffer::new("out");
    let dir = tempfile::tempdir().unwrap();
    let acked = dir.path().join("acked");
    // A source of 300 numbered records that re-reads its first 50 (as a source that
    // restarted from an old offset would): the repeats get the same ids and are
    // dropped. It writes how many acks it heard.
    let code = r#"
import os, drover_pipeline as dp
class Numbers:
    def __init__(self):
        self.next, self.acked, self.replayed = 0, 0, False
    def read(self, most, wait):
        if self.next >= 300:
            if not self.replayed:
                self.replayed = True
                return [dp.SourceMessage(str(i), "n%d" % i) for i in range(50)]
            return []
        end = min(self.next + most, 300)
        batch = [dp.SourceMessage(str(i), "n%d" % i, event_time=i) for i in range(self.next, end)]
        self.next = end
        return batch
    def ack(self, ids):
        self.acked += len(ids)
        with open(os.environ["ACKED"], "w") as f:
            f.write(str(self.acked))
dp.source(Numbers())
"#;
    let p = plane(None, vec![route(None, &out)]);
    let mut replica =
        Replica::start_with(Role::Source, p, Program::Code(code), &[("ACKED", &acked)]);
    until("350 acknowledged reads", || {
        std::fs::read_to_string(&acked).is_ok_and(|s| s == "350")
    })
    .await;
    let got = out.payloads();
    assert_eq!(got.len(), 300, "a replayed record became a second message");
    let stats = out.stats().await.unwrap();
    assert_eq!(stats.duplicates_total, 50);
    replica.child.kill().await.unwrap();
}

#[tokio::test]
async fn a_python_sink_gets_failed_messages_again_until_it_writes_them() {
    let input = MemBuffer::new("in");
    let batch: Vec<Message> = (0..200)
        .map(|i| message(i, if i % 7 == 0 { "flaky" } else { "ok" }))
        .collect();
    input.append(&batch).await.unwrap();
    // Fails each "flaky" message the first time it sees it.
    let code = r#"
import drover_pipeline as dp
seen = set()
def write(batch):
    out = []
    for m in batch:
        if m.payload == b"flaky" and m.id not in seen:
            seen.add(m.id)
            out.append("not today")
        else:
            out.append(None)
    return out
dp.sink(write)
"#;
    let mut p = plane(Some(input.clone()), vec![]);
    p.config.retry_delay = Duration::from_millis(10);
    let counters = p.counters.clone();
    let _replica = Replica::start(Role::Sink, p, Program::Code(code));
    until("every message written", || input.held() == (0, 0)).await;
    let acked = counters.acked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(acked, 200);
    // 29 flaky messages were each delivered twice.
    assert_eq!(
        counters.read.load(std::sync::atomic::Ordering::Relaxed),
        229
    );
}

#[tokio::test]
async fn a_map_that_hangs_or_answers_garbage_gives_its_messages_back() {
    for (what, code) in [
        (
            "hangs",
            "import drover_pipeline as dp, time\ndp.map(lambda m: time.sleep(3600))\n",
        ),
        (
            "garbage",
            // Connects properly, then writes bytes that are not a frame.
            r#"
import json, os, socket, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["DROVER_SOCKET"])
s.sendall(b'{"op":"data","version":1,"role":"map"}\n')
f = s.makefile("rb")
f.readline()
f.read(4)
s.sendall(b"\xff\xff\xff\xff\x02garbage")
time.sleep(30)
"#,
        ),
    ] {
        let (input, out) = (MemBuffer::new("in"), MemBuffer::new("out"));
        input
            .append(&(0..10).map(|i| message(i, "x")).collect::<Vec<_>>())
            .await
            .unwrap();
        let p = plane(Some(input.clone()), vec![route(None, &out)]);
        let _replica = Replica::start(Role::Map, p, Program::Code(code));
        // Once the agent gives up on the program, every message is pending again,
        // none lost and none written downstream.
        until(&format!("a map that {what}: messages given back"), || {
            let s = input.state.lock().unwrap();
            s.leased.is_empty() && s.queue.len() == 10 && s.queue.iter().any(|(_, r)| *r > 0)
        })
        .await;
        assert!(out.payloads().is_empty(), "{what}");
    }
}

#[tokio::test]
async fn a_program_of_the_wrong_role_or_version_is_refused_with_the_reason() {
    let input = MemBuffer::new("in");
    let p = plane(Some(input), vec![]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drover.sock");
    let _socket = TaskSocket::bind_with(
        &path,
        facts(),
        Some(Arc::new(DataEndpoint {
            role: Role::Sink,
            plane: p,
        })),
    )
    .unwrap();
    for (hello, expect) in [
        (
            r#"{"op":"data","version":1,"role":"map"}"#,
            "connected as a map, but this vertex is a sink",
        ),
        (
            r#"{"op":"data","version":7,"role":"sink"}"#,
            "version 7 is not spoken here",
        ),
        (r#"{"op":"data","version":1,"role":"mapper"}"#, "role"),
    ] {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(format!("{hello}\n").as_bytes()).await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut line)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{line}");
        assert!(
            v["error"].as_str().unwrap().contains(expect),
            "{hello}: {line}"
        );
    }
}
