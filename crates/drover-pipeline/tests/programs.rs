//! The SDKs as real programs: the Rust examples and Python scripts run as child
//! processes against a fake agent that speaks the data protocol with `proto`.

mod common;

use common::{Agent, example, finish, input, python, python_code, python_sdk, read, start};
use drover_pipeline::proto::{Frame, HelloReply, Output, Role, SourceMessage};
use std::process::Command;

/// Two batches sent before either is answered (pipelining): the answers come back in
/// order, each message upper-cased with its key and the tag "upper", and the empty
/// message filtered out.
fn check_uppercase_map(cmd: Command) {
    let agent = Agent::new();
    let child = start(cmd, &agent);
    let mut conn = agent.accept(Role::Map);
    let first = vec![
        input(1, "k1", "hello"),
        input(2, "", ""),
        input(3, "", "wörld 42"),
    ];
    let second: Vec<_> = (0..500u32)
        .map(|i| input(i as u8, &format!("key{i}"), &format!("message {i}")))
        .collect();
    conn.send(&Frame::MapRequest {
        batch: 10,
        messages: first,
    });
    conn.send(&Frame::MapRequest {
        batch: 11,
        messages: second,
    });
    let upper = |key: &str, payload: &str| vec![Output::new(payload).key(key).tags(["upper"])];
    assert_eq!(
        conn.expect(),
        Frame::MapResponse {
            batch: 10,
            results: vec![upper("k1", "HELLO"), vec![], upper("", "WöRLD 42")],
        }
    );
    let Frame::MapResponse { batch: 11, results } = conn.expect() else {
        panic!("the second answer is not batch 11's");
    };
    for (i, outputs) in results.iter().enumerate() {
        assert_eq!(
            outputs,
            &upper(&format!("key{i}"), &format!("MESSAGE {i}")),
            "message {i}"
        );
    }
    conn.close();
    let (status, _, stderr) = finish(child);
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn the_rust_uppercase_map_upper_cases_tags_and_keeps_order() {
    check_uppercase_map(Command::new(example("uppercase_map")));
}

#[test]
fn the_python_upper_map_upper_cases_tags_and_keeps_order() {
    check_uppercase_map(python(&python_sdk().join("examples/upper_map.py")));
}

/// A sink prints each message and refuses the empty one; its statuses come back per
/// message, in order.
fn check_print_sink(cmd: Command) {
    let agent = Agent::new();
    let child = start(cmd, &agent);
    let mut conn = agent.accept(Role::Sink);
    conn.send(&Frame::SinkRequest {
        batch: 1,
        messages: vec![
            input(1, "a", "one"),
            input(2, "b", ""),
            input(3, "c", "three"),
        ],
    });
    conn.send(&Frame::SinkRequest {
        batch: 2,
        messages: vec![],
    });
    conn.send(&Frame::SinkRequest {
        batch: 3,
        messages: vec![input(4, "", "four")],
    });
    let failed = || Err("an empty message has nothing to print".to_string());
    assert_eq!(
        conn.expect(),
        Frame::SinkResponse {
            batch: 1,
            statuses: vec![Ok(()), failed(), Ok(())]
        }
    );
    assert_eq!(
        conn.expect(),
        Frame::SinkResponse {
            batch: 2,
            statuses: vec![]
        }
    );
    assert_eq!(
        conn.expect(),
        Frame::SinkResponse {
            batch: 3,
            statuses: vec![Ok(())]
        }
    );
    conn.close();
    let (status, stdout, stderr) = finish(child);
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stdout, "a=one\nc=three\n=four\n");
}

const PYTHON_PRINT_SINK: &str = r#"
import sys
import drover_pipeline as dp

def write(batch):
    results = []
    for m in batch:
        if not m.payload:
            results.append("an empty message has nothing to print")
            continue
        print("%s=%s" % (m.key.decode(), m.payload.decode()), flush=True)
        results.append(None)
    return results

dp.sink(write)
"#;

#[test]
fn the_rust_sink_answers_each_message_of_each_batch() {
    check_print_sink(Command::new(example("print_sink")));
}

#[test]
fn the_python_sink_answers_each_message_of_each_batch() {
    let (cmd, _dir) = python_code(PYTHON_PRINT_SINK);
    check_print_sink(cmd);
}

/// A counting source limited to 5 messages: pipelined reads get 0..3 and 3..5, a read
/// past the end waits and gets none, and acknowledgements reach the source with the
/// ids of their batch.
fn check_counter_source(mut cmd: Command) {
    cmd.env("COUNTER_LIMIT", "5");
    let agent = Agent::new();
    let child = start(cmd, &agent);
    let mut conn = agent.accept(Role::Source);
    conn.send(&read(1, 3, 0));
    conn.send(&read(2, 10, 0));
    let counted = |range: std::ops::Range<u64>| -> Vec<SourceMessage> {
        range
            .map(|n| {
                SourceMessage::new(n.to_le_bytes(), n.to_string())
                    .key(if n % 2 == 0 { "even" } else { "odd" })
                    .event_time(1_700_000_000_000 + n as i64)
            })
            .collect()
    };
    assert_eq!(
        conn.expect(),
        Frame::ReadResponse {
            batch: 1,
            messages: counted(0..3)
        }
    );
    assert_eq!(
        conn.expect(),
        Frame::ReadResponse {
            batch: 2,
            messages: counted(3..5)
        }
    );
    let asked = std::time::Instant::now();
    conn.send(&read(3, 10, 100));
    assert_eq!(
        conn.expect(),
        Frame::ReadResponse {
            batch: 3,
            messages: vec![]
        }
    );
    assert!(
        asked.elapsed() >= std::time::Duration::from_millis(100),
        "the empty read waited"
    );
    for batch in [2, 1, 3] {
        conn.send(&Frame::AckRequest { batch });
        assert_eq!(conn.expect(), Frame::AckResponse { batch });
    }
    conn.close();
    let (status, stdout, stderr) = finish(child);
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(
        stdout, "acked 3 4\nacked 0 1 2\n",
        "the empty batch 3 acks nothing"
    );
}

const PYTHON_COUNTER_SOURCE: &str = r#"
import os, struct, time
import drover_pipeline as dp

class Counter:
    def __init__(self, limit):
        self.next, self.limit = 0, limit

    def read(self, max_messages, wait):
        end = min(self.limit, self.next + max_messages)
        if end == self.next:
            time.sleep(wait)
        out = [dp.SourceMessage(struct.pack("<Q", n), str(n), key="even" if n % 2 == 0 else "odd",
                                event_time=1700000000000 + n) for n in range(self.next, end)]
        self.next = end
        return out

    def ack(self, ids):
        print("acked " + " ".join(str(struct.unpack("<Q", i)[0]) for i in ids), flush=True)

dp.source(Counter(int(os.environ["COUNTER_LIMIT"])))
"#;

#[test]
fn the_rust_source_reads_pipelined_batches_and_passes_acks_on() {
    check_counter_source(Command::new(example("counter_source")));
}

#[test]
fn the_python_source_reads_pipelined_batches_and_passes_acks_on() {
    let (cmd, _dir) = python_code(PYTHON_COUNTER_SOURCE);
    check_counter_source(cmd);
}

/// Programs that break the protocol, written without the SDK: the agent's side
/// (`proto`) names what is wrong.
#[test]
fn a_program_answering_garbage_or_a_wrong_count_is_caught_with_a_clear_error() {
    let handshake = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["DROVER_SOCKET"])
s.sendall(b'{"op":"data","version":1,"role":"map"}\n')
f = s.makefile("rb")
f.readline()
n, = struct.unpack("<I", f.read(4))
f.read(n)
"#;
    let cases = [
        (
            // A MapResponse with one result for a request of two messages.
            "s.sendall(struct.pack('<IBQII', 17, 2, 7, 1, 0))",
            "MapResponse for batch 7 answers 1 messages; its request carried 2",
        ),
        (
            "s.sendall(b'HTTP/1.1 200 OK\\r\\n\\r\\n')",
            "over the limit",
        ),
        (
            "s.sendall(struct.pack('<IB', 1, 77))",
            "unknown frame kind 77",
        ),
        (
            "s.sendall(struct.pack('<IBQI', 13, 2, 8, 0))",
            "MapResponse frame for batch 8, which has no request outstanding",
        ),
        (
            "s.sendall(struct.pack('<IBQII', 18, 2, 7, 1, 1) + b'\\xff')",
            "MapResponse frame: message 0, output count is 1, which cannot fit",
        ),
    ];
    for (answer, text) in cases {
        let agent = Agent::new();
        let (cmd, _dir) = python_code(&format!("{handshake}{answer}\ns.recv(1)\n"));
        let child = start(cmd, &agent);
        let mut conn = agent.accept(Role::Map);
        conn.send(&Frame::MapRequest {
            batch: 7,
            messages: vec![input(1, "", "a"), input(2, "", "b")],
        });
        let err = conn.recv().expect_err(answer);
        assert!(err.contains(text), "{answer}: {err}");
        conn.close();
        finish(child);
    }
}

/// The SDKs refuse what a broken agent sends: they tell it why in an `Error` frame and
/// exit with an error naming the problem.
fn check_refuses_a_broken_agent(program: impl Fn() -> Command) {
    let cases: [(&[u8], &str); 3] = [
        (&[1, 0, 0, 0, 42], "unknown frame kind 42"),
        (
            &[13, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "SinkRequest",
        ),
        (
            &[13, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0],
            "count is 5, which cannot fit",
        ),
    ];
    for (bytes, text) in cases {
        let agent = Agent::new();
        let child = start(program(), &agent);
        let mut conn = agent.accept(Role::Map);
        conn.write_raw(bytes);
        let told = conn.expect_error();
        assert!(told.contains(text), "{text}: the agent was told {told:?}");
        let (status, _, stderr) = finish(child);
        assert!(!status.success());
        assert!(stderr.contains(text), "{text}: stderr {stderr}");
    }
    // A refused handshake ends the program with the agent's reason.
    let agent = Agent::new();
    let child = start(program(), &agent);
    let (mut conn, _) = agent.accept_hello();
    conn.write_raw(
        &HelloReply::Refused {
            error: "no pipeline vertex here".into(),
        }
        .to_line(),
    );
    let (status, _, stderr) = finish(child);
    assert!(!status.success());
    assert!(
        stderr.contains("refused the data connection: no pipeline vertex here"),
        "{stderr}"
    );
}

#[test]
fn the_rust_sdk_refuses_a_broken_agent_and_says_why() {
    check_refuses_a_broken_agent(|| Command::new(example("uppercase_map")));
}

#[test]
fn the_python_sdk_refuses_a_broken_agent_and_says_why() {
    check_refuses_a_broken_agent(|| python(&python_sdk().join("examples/upper_map.py")));
}
