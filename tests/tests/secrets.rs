//! No error a user can cause shows a secret from a URL: an unknown scheme, an unreachable or
//! unparsable database, a password in the query (which sqlx accepts), NATS credentials.

const SECRET: &str = "hunter2";

async fn error_of(url: &str) -> String {
    let connected = if url.starts_with("postgres") {
        // Through the options, to give up on an unreachable database in a second.
        let options = eda::sql::SqlOptions::new(url).acquire_timeout(std::time::Duration::from_secs(1));
        options.connect().await.map(drop).map_err(|e| e.to_string())
    } else {
        eda::transport::connect(url).await.map(drop).map_err(|e| e.to_string())
    };
    connected.err().unwrap_or_else(|| panic!("`{url}` connected"))
}

#[tokio::test]
async fn no_connection_error_shows_a_password() {
    for url in [
        "postgress://app:hunter2@db/x",
        "postgres://app:hunter2@127.0.0.1:1/x",
        "postgres://app@127.0.0.1:1/x?password=hunter2",
        "postgres://app@127.0.0.1:1/x?sslmode=disable&password=hunter2",
        "postgres://app:hunter2@127.0.0.1:notaport/x",
        "postgresql://app:hunter2@[::1/x",
        "app:hunter2@db/x",
        "nats://app:hunter2@127.0.0.1:1",
        "kafka://app:hunter2@127.0.0.1:9092",
        // librdkafka's refusal of a property repeats its value: a misspelt password property.
        "kafka://127.0.0.1:9092?sasl.pasword=hunter2",
    ] {
        let err = error_of(url).await;
        assert!(!err.contains(SECRET), "`{url}` gave: {err}");
        assert!(!err.is_empty());
    }
    // Still says where it tried.
    let err = error_of("postgres://app:hunter2@127.0.0.1:1/x").await;
    assert!(err.contains("app:***@127.0.0.1:1"), "{err}");
    let err = error_of("postgress://app:hunter2@db/x").await;
    assert!(err.contains("postgress://") && err.contains("app:***@db"), "{err}");
}
