//! The outbox migrations live beside a service's own diesel migrations
//! without breaking `diesel migration revert` (diesel's
//! `revert_last_migration`, run here through the same harness).

mod common;

use diesel::PgConnection;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use testkit::TestDatabase;

fn fixtures(folder: &str) -> FileBasedMigrations {
    FileBasedMigrations::from_path(format!("{}/{folder}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn has_table(conn: &mut PgConnection, table: &str) -> bool {
    common::count(
        conn,
        &format!("pg_tables WHERE schemaname = 'public' AND tablename = '{table}'"),
    ) == 1
}

#[test]
fn outbox_migrate_keeps_the_services_diesel_revert_working() {
    let db = TestDatabase::new("coexist");
    let mut conn = db.connect();
    let service = fixtures("tests/fixtures/service_migrations");
    conn.run_pending_migrations(service.clone()).unwrap();
    outbox::migrate(&mut conn).unwrap(); // applied after the service's own

    // The service's newest migration is still the newest diesel knows of.
    let reverted = conn.revert_last_migration(service).unwrap();
    assert_eq!(reverted.to_string(), "20260101000000");
    assert!(!has_table(&mut conn, "orders"));
    assert!(has_table(&mut conn, "outbox_messages"), "the outbox stays");
}

#[test]
fn a_separate_folder_with_a_newer_version_breaks_revert_as_the_readme_warns() {
    let db = TestDatabase::new("coexist_bad");
    let mut conn = db.connect();
    let service = fixtures("tests/fixtures/service_migrations");
    conn.run_pending_migrations(service.clone()).unwrap();

    // A team vendors the outbox SQL into its own folder under a timestamp
    // newer than its last migration and runs it with diesel.
    let vendored = std::env::temp_dir().join(testkit::unique_name("vendored"));
    let folder = vendored.join("2026-06-01-000000_outbox_tables");
    std::fs::create_dir_all(&folder).unwrap();
    let migration = &outbox::migrate::MIGRATIONS[0];
    std::fs::write(folder.join("up.sql"), migration.up).unwrap();
    std::fs::write(folder.join("down.sql"), migration.down).unwrap();
    conn.run_pending_migrations(FileBasedMigrations::from_path(&vendored).unwrap())
        .unwrap();

    // diesel looks for the newest applied version in the service's folder,
    // does not find it, and refuses.
    let err = conn.revert_last_migration(service).unwrap_err();
    assert!(err.to_string().contains("20260601000000"), "{err}");
    assert!(has_table(&mut conn, "orders"), "nothing was reverted");
    std::fs::remove_dir_all(vendored).unwrap();
}
