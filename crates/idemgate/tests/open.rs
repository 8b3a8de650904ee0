//! `idemgate::open`: store URLs, and the typed errors of bad ones.

use idemgate::{Claim, Error, Key, Store};

fn config_error(r: Result<idemgate::BoxStore, Error>) -> String {
    match r {
        Err(Error::Config { message }) => message,
        Err(e) => panic!("not a config error: {e}"),
        Ok(_) => panic!("opened"),
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn memory_and_sqlite_urls_open_working_stores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup.db");
    for url in [
        "memory:".to_owned(),
        format!("sqlite:{}", path.display()),
        format!("sqlite://{}", path.display()),
    ] {
        let store = idemgate::open(&url).await.unwrap();
        let key = Key::new("open", url.as_str().replace(['/', ':'], "_")).unwrap();
        let claim = store.claim(&key, None, &Default::default()).await.unwrap();
        assert!(matches!(claim, Claim::Acquired(_)), "{url}");
    }
    assert!(path.exists());
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    assert!(config_error(idemgate::open("ftp://x").await).contains("unsupported store URL"));
    assert!(config_error(idemgate::open("sqlite:").await).contains("needs a path"));
    assert!(config_error(idemgate::open("redis+cluster://").await).contains("host:port"));
}

#[cfg(not(feature = "postgres"))]
#[tokio::test]
async fn a_scheme_without_its_feature_names_the_feature() {
    let message = config_error(idemgate::open("postgres://localhost/x").await);
    assert!(message.contains("`postgres` feature"), "{message}");
}
