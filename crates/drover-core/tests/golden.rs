//! The agent protocol's wire format, pinned: each message as the JSON it is on the wire.
//! A change that alters one of these breaks agents or controllers already deployed, so
//! it must come with a new protocol version (docs/versioning.md), not by accident.

use drover_core::protocol::{
    AgentEvent, AgentMessage, Command, ControllerMessage, Hello, LogChunk, LogStream,
};
use drover_core::state::NodeInfo;
use drover_core::{NodeId, TaskId, TaskState};
use serde_json::json;

fn node_info() -> NodeInfo {
    serde_json::from_value(json!({
        "name": "n1",
        "platform": "linux/amd64",
        "runtimes": ["process"],
        "capacity": {"cpu": 2.0, "memory": "1Gi"},
    }))
    .unwrap()
}

/// Checks that `msg` is written as `wire` and that `wire` reads back as `msg`.
fn pinned<T>(msg: T, wire: serde_json::Value)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let written = serde_json::to_value(&msg).unwrap();
    assert_eq!(written, wire, "{msg:?} is written differently");
    let read: T = serde_json::from_value(wire.clone()).unwrap();
    assert_eq!(read, msg, "{wire} reads differently");
}

#[test]
fn agent_messages_are_pinned() {
    pinned(
        AgentMessage::Hello(Hello {
            protocol_version: 2,
            min_protocol_version: Some(1),
            node_id: NodeId::from("node-1"),
            info: node_info(),
            known_tasks: vec![TaskId::from("task-1")],
        }),
        json!({
            "type": "hello",
            "protocol_version": 2,
            "min_protocol_version": 1,
            "node_id": "node-1",
            "info": {
                "name": "n1", "platform": "linux/amd64", "labels": {},
                "runtimes": ["process"], "capacity": {"cpu": 2.0, "memory": 1073741824},
                "agent_version": "", "libc": null, "uname": null, "agent_arch": "",
            },
            "known_tasks": ["task-1"],
        }),
    );
    pinned(
        AgentMessage::Heartbeat {
            at: 5,
            usage: vec![],
            envs: None,
        },
        json!({"type": "heartbeat", "at": 5}),
    );
    pinned(
        AgentMessage::Event(AgentEvent {
            seq: 3,
            task_id: TaskId::from("task-1"),
            state: TaskState::Succeeded,
            reason: String::new(),
            exit: None,
            at: 9,
            ports: vec![],
        }),
        json!({"type": "event", "seq": 3, "task_id": "task-1", "state": "succeeded", "at": 9}),
    );
    pinned(
        AgentMessage::CommandAck { seq: 4 },
        json!({"type": "command_ack", "seq": 4}),
    );
    pinned(
        AgentMessage::Log(LogChunk {
            task_id: TaskId::from("task-1"),
            stream: LogStream::Stdout,
            offset: 0,
            data: b"hi\n".to_vec(),
            at: None,
        }),
        json!({"type": "log", "task_id": "task-1", "stream": "stdout", "offset": 0, "data": "aGkK"}),
    );
    // Since the agent stamps its chunks; a controller that does not know `at` ignores it.
    pinned(
        AgentMessage::Log(LogChunk {
            task_id: TaskId::from("task-1"),
            stream: LogStream::Stdout,
            offset: 3,
            data: b"hi\n".to_vec(),
            at: Some(1_796_292_000_123),
        }),
        json!({"type": "log", "task_id": "task-1", "stream": "stdout", "offset": 3, "data": "aGkK", "at": 1_796_292_000_123i64}),
    );
    pinned(
        AgentMessage::Unsupported {
            seq: 8,
            reason: "no".into(),
        },
        json!({"type": "unsupported", "seq": 8, "reason": "no"}),
    );
}

#[test]
fn controller_messages_are_pinned() {
    pinned(
        ControllerMessage::Welcome {
            protocol_version: 1,
            node_id: NodeId::from("node-1"),
            heartbeat_interval_ms: 2000,
            last_event_seq: 7,
        },
        json!({"type": "welcome", "protocol_version": 1, "node_id": "node-1", "heartbeat_interval_ms": 2000, "last_event_seq": 7}),
    );
    pinned(
        ControllerMessage::Reject { reason: "r".into() },
        json!({"type": "reject", "reason": "r"}),
    );
    pinned(
        ControllerMessage::EventAck { seq: 2 },
        json!({"type": "event_ack", "seq": 2}),
    );
    pinned(
        ControllerMessage::LogResync {
            task_id: TaskId::from("task-1"),
            stream: LogStream::Stderr,
            offset: 10,
        },
        json!({"type": "log_resync", "task_id": "task-1", "stream": "stderr", "offset": 10}),
    );
    for (command, wire) in [
        (
            Command::Stop {
                task_id: TaskId::from("task-1"),
                grace_ms: 500,
                reason: "user".into(),
            },
            json!({"kind": "stop", "task_id": "task-1", "grace_ms": 500, "reason": "user"}),
        ),
        (
            Command::Forget {
                task_id: TaskId::from("task-1"),
            },
            json!({"kind": "forget", "task_id": "task-1"}),
        ),
        (Command::PruneEnvs, json!({"kind": "prune_envs"})),
    ] {
        pinned(
            ControllerMessage::Command { seq: 1, command },
            json!({"type": "command", "seq": 1, "command": wire}),
        );
    }
}

#[test]
fn a_version_1_hello_and_a_start_are_read() {
    // What a version 1 agent sends: no version range.
    let hello: AgentMessage = serde_json::from_value(json!({
        "type": "hello", "protocol_version": 1, "node_id": "node-1",
        "info": {"name": "n1", "platform": "linux/amd64", "runtimes": ["process"],
                 "capacity": {"cpu": 1.0, "memory": "1Gi"}},
        "known_tasks": [],
    }))
    .unwrap();
    let AgentMessage::Hello(h) = hello else {
        panic!("not a hello")
    };
    assert_eq!((h.protocol_version, h.min_protocol_version), (1, None));

    // A Start as the version 1 controller wrote it.
    let start: ControllerMessage = serde_json::from_value(json!({
        "type": "command", "seq": 5,
        "command": {"kind": "start", "task_id": "task-1", "job_id": "job-1", "project": "default",
                    "job_name": "j", "index": 0, "attempt": 0,
                    "spec": {"name": "j", "command": ["true"]}},
    }))
    .unwrap();
    let ControllerMessage::Command {
        command: Command::Start(a),
        ..
    } = start
    else {
        panic!("not a start")
    };
    assert_eq!(a.spec.command, vec!["true".to_string()]);
}

#[test]
fn what_a_newer_peer_adds_is_tolerated() {
    // A message type, a command and spec fields this build does not know.
    let m: AgentMessage =
        serde_json::from_value(json!({"type": "drained", "vertex": "v1"})).unwrap();
    assert_eq!(m, AgentMessage::Unknown);
    let m: ControllerMessage =
        serde_json::from_value(json!({"type": "rebalance", "to": "node-2"})).unwrap();
    assert_eq!(m, ControllerMessage::Unknown);
    let m: ControllerMessage = serde_json::from_value(json!({
        "type": "command", "seq": 9, "command": {"kind": "drain", "task_id": "task-1"},
    }))
    .unwrap();
    assert_eq!(
        m,
        ControllerMessage::Command {
            seq: 9,
            command: Command::Unknown
        }
    );
    let m: ControllerMessage = serde_json::from_value(json!({
        "type": "command", "seq": 5,
        "command": {"kind": "start", "task_id": "task-1", "job_id": "job-1", "project": "default",
                    "job_name": "j", "index": 0, "attempt": 0, "future_field": true,
                    "spec": {"name": "j", "command": ["true"], "pipeline": {"vertex": "map"},
                             "resources": {"cpu": 1.0, "gpus": 2}}},
    }))
    .unwrap();
    assert!(matches!(
        m,
        ControllerMessage::Command {
            command: Command::Start(_),
            ..
        }
    ));
}
