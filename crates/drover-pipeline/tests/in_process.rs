//! The Rust SDK's contract checks, with the SDK on a thread of the test (so a test can
//! hand it a function that misbehaves) and the fake agent on the other side.

mod common;

use common::{Agent, input, read};
use drover_pipeline::proto::{Frame, HelloReply, Role};
use drover_pipeline::{PipelineError, Source, SourceMessage};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

fn serve<F>(agent: &Agent, f: F) -> JoinHandle<Result<(), PipelineError>>
where
    F: FnOnce(PathBuf) -> Result<(), PipelineError> + Send + 'static,
{
    let path = agent.path.clone();
    std::thread::spawn(move || f(path))
}

#[test]
fn a_sink_answering_the_wrong_number_of_results_tells_the_agent_and_stops() {
    let agent = Agent::new();
    let program = serve(&agent, |p| {
        drover_pipeline::sink_at(&p, |batch| vec![Ok(()); batch.len() + 1])
    });
    let mut conn = agent.accept(Role::Sink);
    conn.send(&Frame::SinkRequest {
        batch: 1,
        messages: vec![input(1, "", "x")],
    });
    let told = conn.expect_error();
    assert!(
        told.contains("answered 2 results for a batch of 1 messages"),
        "{told}"
    );
    let err = program.join().unwrap().unwrap_err();
    assert!(matches!(err, PipelineError::Program(_)), "{err:?}");
}

/// A source whose reads return what it was built with and whose acks are recorded.
struct Scripted {
    reads: Vec<Result<Vec<SourceMessage>, String>>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<Vec<Vec<u8>>>>>,
}

impl Source for Scripted {
    fn read(&mut self, _max: usize, _wait: Duration) -> Result<Vec<SourceMessage>, String> {
        self.reads.remove(0)
    }

    fn ack(&mut self, ids: &[Vec<u8>]) -> Result<(), String> {
        self.acked.lock().unwrap().push(ids.to_vec());
        Ok(())
    }
}

fn scripted(reads: Vec<Result<Vec<SourceMessage>, String>>) -> Scripted {
    Scripted {
        reads,
        acked: Default::default(),
    }
}

#[test]
fn a_source_that_reads_too_much_or_fails_tells_the_agent_why() {
    let two = vec![SourceMessage::new("a", "1"), SourceMessage::new("b", "2")];
    let cases = [
        (Ok(two), "returned 2 messages when at most 1 were asked for"),
        (
            Err("the upstream is gone".to_string()),
            "the source's read failed: the upstream is gone",
        ),
    ];
    for (answer, text) in cases {
        let agent = Agent::new();
        let program = serve(&agent, move |p| {
            drover_pipeline::source_at(&p, scripted(vec![answer]))
        });
        let mut conn = agent.accept(Role::Source);
        conn.send(&read(1, 1, 0));
        let told = conn.expect_error();
        assert!(told.contains(text), "{told}");
        let err = program.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(text), "{err}");
    }
}

#[test]
fn a_source_acks_exactly_the_ids_of_the_batch_and_refuses_an_ack_for_no_batch() {
    let agent = Agent::new();
    let source = scripted(vec![
        Ok(vec![
            SourceMessage::new("a", "1"),
            SourceMessage::new("", "2"),
        ]),
        Ok(vec![SourceMessage::new("c", "3")]),
    ]);
    let acked = source.acked.clone();
    let program = serve(&agent, move |p| drover_pipeline::source_at(&p, source));
    let mut conn = agent.accept(Role::Source);
    conn.send(&read(5, 9, 0));
    conn.send(&read(6, 9, 0));
    conn.expect();
    conn.expect();
    conn.send(&Frame::AckRequest { batch: 6 });
    assert_eq!(conn.expect(), Frame::AckResponse { batch: 6 });
    assert_eq!(*acked.lock().unwrap(), vec![vec![b"c".to_vec()]]);
    // An ack of batch 6 again is an ack for a batch the source no longer holds.
    conn.write_raw(&{
        let mut b = Vec::new();
        drover_pipeline::proto::encode(&Frame::AckRequest { batch: 6 }, &mut b).unwrap();
        b
    });
    let told = conn.expect_error();
    assert!(
        told.contains("AckRequest for batch 6, which was never read or is already acknowledged"),
        "{told}"
    );
    let err = program.join().unwrap().unwrap_err();
    assert!(matches!(err, PipelineError::Protocol { .. }), "{err:?}");
    assert_eq!(
        acked.lock().unwrap().len(),
        1,
        "batch 5 was never acknowledged"
    );
}

#[test]
fn an_agent_of_another_version_or_a_bad_answer_ends_the_handshake() {
    let cases: [(&[u8], &str); 3] = [
        (
            b"{\"ok\":true,\"version\":2,\"max_batch\":500}\n",
            "speaks data protocol version 2; this SDK speaks 1",
        ),
        (b"{\"ok\":true}\n", "has no max_batch"),
        (
            b"{\"ok\":true,\"version\":1,\"max_batch\":500}",
            "without a newline",
        ),
    ];
    for (reply, text) in cases {
        let agent = Agent::new();
        let program = serve(&agent, |p| drover_pipeline::map_at(&p, |_| vec![]));
        let (mut conn, _) = agent.accept_hello();
        conn.write_raw(reply);
        if !reply.ends_with(b"\n") {
            // The program waits for the rest of the line until the connection closes.
            conn.close();
        }
        let err = program.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(text), "{err}");
    }
    let agent = Agent::new();
    let program = serve(&agent, |p| drover_pipeline::map_at(&p, |_| vec![]));
    let (mut conn, _) = agent.accept_hello();
    conn.write_raw(
        &HelloReply::Refused {
            error: "busy".into(),
        }
        .to_line(),
    );
    let err = program.join().unwrap().unwrap_err();
    assert!(
        matches!(err, PipelineError::Refused { ref message, .. } if message == "busy"),
        "{err:?}"
    );
}

#[test]
fn a_map_whose_outputs_overflow_a_frame_tells_the_agent() {
    let agent = Agent::new();
    let program = serve(&agent, |p| {
        drover_pipeline::map_at(&p, |_| {
            vec![drover_pipeline::Output::new(vec![0u8; 33 << 20])]
        })
    });
    let mut conn = agent.accept(Role::Map);
    conn.send(&Frame::MapRequest {
        batch: 3,
        messages: vec![input(1, "", "a"), input(2, "", "b")],
    });
    let told = conn.expect_error();
    assert!(
        told.contains("answer to batch 3 cannot be sent") && told.contains("over the limit"),
        "{told}"
    );
    assert!(matches!(
        program.join().unwrap(),
        Err(PipelineError::Program(_))
    ));
}
