//! Workload specs: expansion is deterministic and exact, and bad specs are refused by field.

use std::{collections::HashSet, time::Duration};

use fidelity::{Arrival, Pacing, SpecError, WorkloadSpec, workload::MAX_REQUESTS};

/// The test model's vocabulary (191 ids; 189 and 190 are its special ids).
const VOCAB: u32 = 191;

fn spec(text: &str) -> WorkloadSpec {
    WorkloadSpec::from_toml(text).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(text: &str) -> Vec<String> {
    match WorkloadSpec::from_toml(text) {
        Ok(spec) => panic!("accepted: {spec:?}"),
        Err(err) => {
            eprintln!("{err}");
            err.fields().into_iter().map(str::to_owned).collect()
        }
    }
}

const MIXED: &str = r#"
[arrival]
kind = "fixed-rate"
rate = 4.0

[[requests]]
count = 5
prompt_tokens = 32
output_tokens = 8
prefix_group = "sys"
shared_prefix_tokens = 16

[[requests]]
count = 3
prompt_tokens = 40
output_tokens = 2
ignore_eos = false
prefix_group = "sys"
shared_prefix_tokens = 8
seed = 9

[[requests]]
count = 4
prompt_tokens = 20
output_tokens = 1
"#;

#[test]
fn expansion_is_deterministic_and_keeps_counts_lengths_and_vocabulary() {
    let workload = spec(MIXED);
    let plan = workload.expand(VOCAB).unwrap();
    assert_eq!(plan, workload.expand(VOCAB).unwrap(), "the same spec gives the same requests");
    assert_eq!(plan.pacing(), Pacing::Open);
    assert_eq!(plan.requests().len(), 12);
    let shapes: Vec<_> =
        plan.requests().iter().map(|r| (r.class, r.prompt.len(), r.max_tokens, r.ignore_eos)).collect();
    let expected: Vec<_> = [(0, 32, 8, true); 5]
        .into_iter()
        .chain([(1, 40, 2, false); 3])
        .chain([(2, 20, 1, true); 4])
        .collect();
    assert_eq!(shapes, expected, "classes in file order, exact lengths, ignore_eos defaults to true");
    let indices: Vec<_> = plan.requests().iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..12).collect::<Vec<_>>());
    assert!(plan.requests().iter().flat_map(|r| &r.prompt).all(|&id| id < VOCAB - 2), "special ids avoided");
    // Fixed rate: request i at i / rate.
    for r in plan.requests() {
        assert_eq!(r.at, Duration::from_millis(250 * r.index as u64));
    }
    // Another vocabulary, other ids (same shapes).
    let other = workload.expand(50_000).unwrap();
    assert_ne!(other.requests()[0].prompt, plan.requests()[0].prompt);
    assert!(other.requests().iter().flat_map(|r| &r.prompt).any(|&id| id >= VOCAB));
}

#[test]
fn a_prefix_group_shares_its_leading_tokens_and_nothing_else() {
    let plan = spec(MIXED).expand(VOCAB).unwrap();
    let (first, second, free): (Vec<_>, Vec<_>, Vec<_>) = (
        plan.requests().iter().filter(|r| r.class == 0).collect(),
        plan.requests().iter().filter(|r| r.class == 1).collect(),
        plan.requests().iter().filter(|r| r.class == 2).collect(),
    );
    let prefix = &first[0].prompt[..16];
    assert!(first.iter().all(|r| &r.prompt[..16] == prefix), "16 shared tokens in class 0");
    assert!(second.iter().all(|r| r.prompt[..8] == prefix[..8]), "class 1 takes the group's first 8");
    // Past the shared part every prompt is its own: no two tails are equal, and class 1 leaves
    // the group where it said it would (its 9th token is not the group's, for some request).
    let tails: HashSet<&[u32]> = first
        .iter()
        .map(|r| &r.prompt[16..])
        .chain(second.iter().map(|r| &r.prompt[8..]))
        .chain(free.iter().map(|r| &r.prompt[..]))
        .collect();
    assert_eq!(tails.len(), 12);
    assert!(second.iter().any(|r| r.prompt[8..16] != prefix[8..16]));
    assert!(free.iter().all(|r| r.prompt[..8] != prefix[..8]), "no group, no shared prefix");
}

#[test]
fn each_arrival_kind_gives_its_offsets() {
    let with = |arrival: &str| {
        spec(&format!("{arrival}\n[[requests]]\ncount = 400\nprompt_tokens = 4\noutput_tokens = 1\n"))
    };
    let burst = with("[arrival]\nkind = \"burst\"").expand(VOCAB).unwrap();
    assert!(burst.requests().iter().all(|r| r.at == Duration::ZERO) && burst.pacing() == Pacing::Open);

    let closed = with("[arrival]\nkind = \"closed-loop\"\nclients = 3").expand(VOCAB).unwrap();
    assert_eq!(closed.pacing(), Pacing::ClosedLoop { clients: 3 });

    let poisson = |seed: u64| {
        with(&format!("[arrival]\nkind = \"poisson\"\nrate = 20.0\nseed = {seed}")).expand(VOCAB).unwrap()
    };
    let p = poisson(1);
    assert_eq!(p, poisson(1), "seeded");
    assert_ne!(
        p.requests().iter().map(|r| r.at).collect::<Vec<_>>(),
        poisson(2).requests().iter().map(|r| r.at).collect::<Vec<_>>()
    );
    assert_eq!(p.requests()[0].at, Duration::ZERO, "the first request goes at once");
    assert!(p.requests().windows(2).all(|w| w[0].at <= w[1].at));
    // 399 exponential gaps of mean 50 ms: their mean is within 15 % of it (about 3 standard errors).
    let mean_gap = p.requests()[399].at.as_secs_f64() / 399.0;
    assert!((mean_gap - 0.05).abs() < 0.0075, "mean gap {mean_gap}");
    let gaps: HashSet<_> = p.requests().windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps.len() > 390, "gaps vary");
}

#[test]
fn a_trace_sends_request_i_at_its_timestamp_in_time_order() {
    let plan = spec(
        r#"
[arrival]
kind = "trace"
at_ms = [30, 0, 12.5]
[[requests]]
count = 2
prompt_tokens = 5
output_tokens = 2
[[requests]]
count = 1
prompt_tokens = 7
output_tokens = 3
"#,
    )
    .expand(VOCAB)
    .unwrap();
    let order: Vec<_> = plan.requests().iter().map(|r| (r.index, r.class, r.at)).collect();
    assert_eq!(
        order,
        [(1, 0, Duration::ZERO), (2, 1, Duration::from_micros(12_500)), (0, 0, Duration::from_millis(30))]
    );
}

#[test]
fn a_shuffle_interleaves_classes_the_same_way_every_time() {
    let shuffled = format!("shuffle_seed = 4\n{MIXED}");
    let plan = spec(&shuffled).expand(VOCAB).unwrap();
    assert_eq!(plan, spec(&shuffled).expand(VOCAB).unwrap());
    let classes: Vec<_> = plan.requests().iter().map(|r| r.class).collect();
    assert_ne!(classes, [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]);
    let mut sorted = classes.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], "the same requests, reordered");
    // Prompts follow their class: the shuffled plan holds the unshuffled plan's prompts.
    let unshuffled: HashSet<_> =
        spec(MIXED).expand(VOCAB).unwrap().requests().iter().map(|r| r.prompt.clone()).collect();
    assert!(plan.requests().iter().all(|r| unshuffled.contains(&r.prompt)));
}

#[test]
fn bad_specs_are_refused_naming_each_field() {
    let one = "[[requests]]\ncount = 1\nprompt_tokens = 4\noutput_tokens = 1\n";
    let cases: Vec<(String, &[&str])> = vec![
        (one.to_owned(), &["arrival"]),
        ("[arrival]\nkind = \"burst\"\n".to_owned(), &["requests"]),
        (format!("[arrival]\nkind = \"sometimes\"\n{one}"), &["arrival.kind"]),
        (format!("[arrival]\nrate = 2.0\n{one}"), &["arrival.kind"]),
        (format!("[arrival]\nkind = \"poisson\"\n{one}"), &["arrival.rate"]),
        (format!("[arrival]\nkind = \"fixed-rate\"\nrate = 0.0\n{one}"), &["arrival.rate"]),
        (format!("[arrival]\nkind = \"fixed-rate\"\nrate = -3.0\n{one}"), &["arrival.rate"]),
        (format!("[arrival]\nkind = \"fixed-rate\"\nrate = nan\n{one}"), &["arrival.rate"]),
        (format!("[arrival]\nkind = \"fixed-rate\"\nrate = 1e-9\n{one}"), &["arrival.rate"]),
        (format!("[arrival]\nkind = \"closed-loop\"\nclients = 0\n{one}"), &["arrival.clients"]),
        (format!("[arrival]\nkind = \"closed-loop\"\nclients = -2\n{one}"), &["arrival.clients"]),
        (format!("[arrival]\nkind = \"burst\"\nrate = 2.0\nclients = 3\n{one}"), &["arrival.rate", "arrival.clients"]),
        (format!("[arrival]\nkind = \"trace\"\nat_ms = [0, 1]\n{one}"), &["arrival.at_ms"]),
        (format!("[arrival]\nkind = \"trace\"\nat_ms = [-1]\n{one}"), &["arrival.at_ms[0]"]),
        (
            "[arrival]\nkind = \"burst\"\n[[requests]]\ncount = 0\nprompt_tokens = 0\noutput_tokens = -1\n".to_owned(),
            &["requests[0].count", "requests[0].prompt_tokens", "requests[0].output_tokens"],
        ),
        (
            format!("[arrival]\nkind = \"burst\"\n{one}[[requests]]\nprompt_tokens = 4\n"),
            &["requests[1].count", "requests[1].output_tokens"],
        ),
        (
            format!("[arrival]\nkind = \"burst\"\n{one}prefix_group = \"g\"\n"),
            &["requests[0].shared_prefix_tokens"],
        ),
        (
            format!("[arrival]\nkind = \"burst\"\n{one}shared_prefix_tokens = 2\n"),
            &["requests[0].prefix_group"],
        ),
        (
            format!("[arrival]\nkind = \"burst\"\n{one}prefix_group = \"g\"\nshared_prefix_tokens = 5\n"),
            &["requests[0].shared_prefix_tokens"],
        ),
        (
            "[arrival]\nkind = \"burst\"\n[[requests]]\ncount = 1\nprompt_tokens = 2000000\noutput_tokens = 1\n".to_owned(),
            &["requests[0].prompt_tokens"],
        ),
        (
            format!("[arrival]\nkind = \"burst\"\n[[requests]]\ncount = {}\nprompt_tokens = 1\noutput_tokens = 1\n", MAX_REQUESTS + 1),
            &["requests"],
        ),
        (
            "[arrival]\nkind = \"burst\"\n[[requests]]\ncount = 100000\nprompt_tokens = 1000\noutput_tokens = 1\n".to_owned(),
            &["requests"],
        ),
    ];
    for (text, fields) in cases {
        assert_eq!(refused(&text), fields, "{text}");
    }
    // Unknown keys and syntax errors are the parser's, with the key in the message.
    for text in [format!("[arrival]\nkind = \"burst\"\n{one}colour = 1\n"), "[arrival\n".to_owned()] {
        let err = WorkloadSpec::from_toml(&text).expect_err("refused");
        assert!(matches!(err, SpecError::Syntax(_)), "{err:?}");
    }
    let err =
        WorkloadSpec::from_toml(&format!("[arrival]\nkind = \"burst\"\n{one}colour = 1\n")).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    // A vocabulary with no ordinary id.
    let err = spec(&format!("[arrival]\nkind = \"burst\"\n{one}")).expand(2).expect_err("no ids");
    assert_eq!(err.fields(), ["vocab_size"]);
}

#[test]
fn a_spec_built_in_code_is_checked_the_same_way() {
    let spec = WorkloadSpec {
        arrival: Arrival::ClosedLoop { clients: 20_000 },
        requests: vec![],
        shuffle_seed: None,
    };
    assert_eq!(spec.validate().unwrap_err().fields(), ["requests", "arrival.clients"]);
    assert!(spec.expand(VOCAB).is_err(), "expand validates too");
}

#[test]
fn a_jsonl_trace_is_one_request_per_line() {
    let text = r#"{"at_ms": 40, "prompt_tokens": 12, "output_tokens": 3, "prefix_group": "p", "shared_prefix_tokens": 6}

{"at_ms": 0, "prompt_tokens": 9, "output_tokens": 2, "ignore_eos": false}
{"at_ms": 10, "prompt_tokens": 10, "output_tokens": 1, "prefix_group": "p", "shared_prefix_tokens": 6}
"#;
    let spec = WorkloadSpec::from_jsonl(text).unwrap();
    assert_eq!(spec.arrival, Arrival::Trace { at_ms: vec![40.0, 0.0, 10.0] });
    let plan = spec.expand(VOCAB).unwrap();
    let shapes: Vec<_> =
        plan.requests().iter().map(|r| (r.index, r.prompt.len(), r.max_tokens, r.ignore_eos)).collect();
    assert_eq!(shapes, [(1, 9, 2, false), (2, 10, 1, true), (0, 12, 3, true)]);
    assert_eq!(plan.requests()[1].prompt[..6], plan.requests()[2].prompt[..6], "the group's prefix");

    let bad = "{\"at_ms\": 0, \"prompt_tokens\": 9, \"output_tokens\": 2}\n{\"prompt_tokens\": 0, \"output_tokens\": 2}\n";
    assert_eq!(
        WorkloadSpec::from_jsonl(bad).unwrap_err().fields(),
        ["line 2: at_ms", "line 2: prompt_tokens"]
    );
    let err = WorkloadSpec::from_jsonl("{\"at_ms\": 0, \"prompt\": 3}\n").unwrap_err();
    assert!(matches!(&err, SpecError::Syntax(m) if m.starts_with("line 1:")), "{err}");
    assert_eq!(WorkloadSpec::from_jsonl("\n\n").unwrap_err().fields(), ["requests"]);
}

/// The example workloads shipped in `fidelity/workloads/` (docs/fidelity.md runs them) are valid.
#[test]
fn the_shipped_workloads_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
    let mut read = 0;
    for entry in std::fs::read_dir(&dir).expect("fidelity/workloads exists") {
        let path = entry.expect("an entry").path();
        let spec = fidelity::WorkloadSpec::read(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!spec.expand(128_000).expect("expands").requests().is_empty(), "{}", path.display());
        read += 1;
    }
    assert!(read > 0, "no workload in {}", dir.display());
}
