//! Reconcile's SpiceDB reader against the instant read source: every
//! relationship of a type is read exactly once, in one stream, whether the
//! server implements `ExportBulkRelationships` or not, and when streams
//! break midway (resumed from the last cursor at the same snapshot).

use authz_outbox::reconcile::spicedb::Tuple;
use authz_outbox::reconcile::{SpiceDbConfig, SpiceDbReader};
use authz_outbox_proof::export_source::{Dataset, ExportSource, Faults};

const DATASET: Dataset = Dataset {
    agents: 7,
    last_key: 2_000,
    missing: (1_001, 1_010),
    tasks: 0,
};

fn text(t: &Tuple) -> String {
    format!(
        "{}:{}#{}@{}:{}",
        t.resource_type, t.resource_id, t.relation, t.subject_type, t.subject_id
    )
}

/// Every relationship of `resource_type` the source holds, in its order.
fn expected(resource_type: &str) -> Vec<String> {
    (0..DATASET.len(resource_type))
        .map(|i| {
            let r = DATASET.get(resource_type, i);
            let (resource, subject) = (r.resource.unwrap(), r.subject.unwrap().object.unwrap());
            format!(
                "{}:{}#{}@{}:{}",
                resource.object_type,
                resource.object_id,
                r.relation,
                subject.object_type,
                subject.object_id
            )
        })
        .collect()
}

async fn read_all(
    source: &ExportSource,
    page_size: u32,
    resource_type: &str,
) -> Result<(Vec<String>, usize), authz_outbox::reconcile::SpiceDbError> {
    let mut config = SpiceDbConfig::new(source.endpoint());
    config.page_size = page_size;
    let reader = SpiceDbReader::connect(&config).await?;
    let mut pages = reader.pages(resource_type);
    let (mut read, mut batches) = (Vec::new(), 0);
    while let Some(page) = pages.next_page().await? {
        assert!(
            page.len() <= page_size as usize,
            "a batch larger than the page size"
        );
        batches += 1;
        read.extend(page.iter().map(text));
    }
    Ok((read, batches))
}

#[tokio::test]
async fn export_reads_every_relationship_once_in_batches() {
    let source = ExportSource::start(DATASET).await.unwrap();
    let (read, batches) = read_all(&source, 100, "api_key").await.unwrap();
    assert_eq!(read.len(), 2 * (2_000 - 10));
    assert_eq!(read, expected("api_key"));
    assert_eq!(batches, read.len().div_ceil(100));
    let (agents, _) = read_all(&source, 100, "agent").await.unwrap();
    assert_eq!(agents, expected("agent"));
}

#[tokio::test]
async fn broken_export_streams_resume_from_the_last_cursor() {
    let faults = Faults {
        break_after_messages: Some(3),
        breaks: 3,
        ..Faults::default()
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let (read, _) = read_all(&source, 100, "api_key").await.unwrap();
    assert_eq!(source.breaks_left(), 0, "the streams did break");
    assert_eq!(read, expected("api_key"), "nothing skipped, nothing twice");
}

#[tokio::test]
async fn without_export_one_read_stream_is_batched_and_resumed() {
    let faults = Faults {
        export_unimplemented: true,
        // Mid-batch: 150 single-relationship messages is one and a half
        // batches of 100.
        break_after_messages: Some(150),
        breaks: 2,
        ..Faults::default()
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let (read, batches) = read_all(&source, 100, "api_key").await.unwrap();
    assert_eq!(source.breaks_left(), 0, "the streams did break");
    assert_eq!(read, expected("api_key"), "nothing skipped, nothing twice");
    assert!(
        batches >= read.len() / 100,
        "gathered into batches, got {batches}"
    );
}

#[tokio::test]
async fn streams_that_break_after_every_batch_still_read_everything() {
    let faults = Faults {
        break_after_messages: Some(1),
        breaks: 1_000,
        ..Faults::default()
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let (read, _) = read_all(&source, 100, "api_key").await.unwrap();
    assert_eq!(read, expected("api_key"));
}

#[tokio::test]
async fn a_stream_that_breaks_before_any_progress_is_an_error_not_a_short_read() {
    let faults = Faults {
        break_after_messages: Some(0),
        breaks: 1_000,
        ..Faults::default()
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let error = read_all(&source, 100, "api_key").await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("Unavailable"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
}

#[tokio::test]
async fn a_read_without_cursors_is_not_restarted_after_it_handed_out_batches() {
    // Restarting from the top would stage the first batches twice.
    let faults = Faults {
        export_unimplemented: true,
        omit_read_cursors: true,
        break_after_messages: Some(150),
        breaks: 1,
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let error = read_all(&source, 100, "api_key").await.unwrap_err();
    assert!(error.to_string().contains("Unavailable"), "{error}");

    // Unbroken, the same server is read whole.
    let faults = Faults {
        export_unimplemented: true,
        omit_read_cursors: true,
        ..Faults::default()
    };
    let source = ExportSource::start_with(DATASET, faults).await.unwrap();
    let (read, _) = read_all(&source, 100, "api_key").await.unwrap();
    assert_eq!(read, expected("api_key"));
}
