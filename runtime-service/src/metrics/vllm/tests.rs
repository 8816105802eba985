//! The vLLM series: names the crate accepts, vLLM's labels and buckets, one request's values.

use std::time::Duration;

use prometheus::{Encoder, IntCounter, TextEncoder};
use tokio::time::Instant;

use super::*;

fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("encodes");
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn the_buckets_of_token_counts_are_vllms_1_2_5() {
    assert_eq!(buckets_1_2_5(100), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
    assert_eq!(buckets_1_2_5(768).last(), Some(&500.0));
    assert_eq!(buckets_1_2_5(0), [1.0], "never empty (the crate would substitute its defaults)");
}

#[test]
fn names_with_colons_register_and_render_with_vllms_labels() {
    let registry = Registry::new();
    let vllm = Vllm::register(&registry, 1024).expect("the crate accepts ':' in names");
    let mut series = vllm.model("m");
    series.cache_config(16, 0);
    let text = render(&registry);
    assert!(text.contains("# TYPE vllm:num_preemptions_total counter"), "{text}");
    assert!(
        text.contains(r#"vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0"#)
    );
    assert!(
        text.contains(r#"vllm:time_to_first_token_seconds_bucket{engine="0",model_name="m",le="2560"} 0"#)
    );
    assert!(!text.contains("vllm:cache_config_info{"), "not before the blocks are known");
    series.cache_config(16, 100);
    series.cache_config(16, 120);
    let text = render(&registry);
    assert!(text.contains(r#"block_size="16",engine="0",model_name="m",num_gpu_blocks="120"} 1"#), "{text}");
    assert!(!text.contains(r#"num_gpu_blocks="100""#), "the old geometry is gone");
}

#[test]
fn a_request_counts_its_first_token_gaps_and_end_as_vllm_does() {
    let registry = Registry::new();
    let series = Vllm::register(&registry, 1024).expect("registers").model("m");
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut request = RequestStats::new(t0, ms(10), 7);
    assert!(request.schedule(ms(30)));
    assert!(!request.schedule(ms(90)), "preempted and rescheduled: still its first step");
    for at in [50, 60, 80] {
        series.token(&mut request, ms(at));
    }
    series.finished(&request, Finish::Length, ms(80));
    assert!((series.ttft.get_sample_sum() - 0.05).abs() < 1e-9, "from its receipt");
    assert_eq!(series.itl.get_sample_count(), 2);
    assert!((series.itl.get_sample_sum() - 0.03).abs() < 1e-9);
    assert!((series.tpot.get_sample_sum() - 0.015).abs() < 1e-9, "30 ms over 2 tokens");
    assert!((series.queue.get_sample_sum() - 0.02).abs() < 1e-9);
    assert!((series.e2e.get_sample_sum() - 0.08).abs() < 1e-9);
    assert_eq!((series.prompt_tokens.get(), series.generation_tokens.get()), (7, 3));
    assert_eq!(series.success.each_ref().map(IntCounter::get), [0, 1, 0]);

    // Aborted while waiting: no token, its whole life was queue time.
    let waiting = RequestStats::new(t0, ms(10), 4);
    series.finished(&waiting, Finish::Abort, ms(510));
    assert!((series.queue.get_sample_sum() - 0.52).abs() < 1e-9);
    assert_eq!(series.success[2].get(), 1);
    assert_eq!(series.prompt_tokens.get(), 7, "a prompt never processed is not counted");
}
