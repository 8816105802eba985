//! Reading what a server answered: a sample from Prometheus text, the fields a BadRequest names,
//! and whether a refusal is one a caller can act on. Plain functions of the answer, no I/O.

/// The value of the first sample of metric `name` whose labels include every `labels` pair
/// (written `key="value"`), in Prometheus text; `None` if there is none.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

/// The fields a status's BadRequest details name, in order.
pub fn bad_request_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Whether `status` is a refusal a caller can act on: a code in `allowed`, a message saying
/// why, bounded in size. The fuzz tests' check of every error.
pub fn proper_refusal(status: &tonic::Status, allowed: &[tonic::Code]) -> Result<(), String> {
    if !allowed.contains(&status.code()) {
        return Err(format!("unexpected code: {status:?}"));
    }
    if status.message().is_empty() {
        return Err(format!("no message: {status:?}"));
    }
    if status.message().len() >= 8192 {
        return Err(format!("message of {} bytes", status.message().len()));
    }
    Ok(())
}
