//! A table name given to a `with_table`, checked before any statement uses it.

use idemgate_core::{Error, Result};

use crate::Dialect;

/// A table name as a `with_table` received it. Setting it cannot fail; a name that is not an
/// identifier of the dialect makes every call that would run SQL on it fail with
/// [`Error::Config`] before any statement is sent, so a bad name never reaches the database.
///
/// ```
/// use idemgate_sql::{Dialect, Table};
///
/// assert_eq!(Table::new(Dialect::Postgres, "orders_inbox").name().unwrap(), "orders_inbox");
/// assert!(Table::new(Dialect::Postgres, "x; drop table y").name().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    name: String,
    /// Why the name is refused, if it is.
    refused: Option<String>,
}

impl Table {
    /// `name`, checked against `dialect`'s rule for table names.
    pub fn new(dialect: Dialect, name: impl Into<String>) -> Self {
        let name = name.into();
        let refused = match dialect.check_table(&name) {
            Ok(()) => None,
            Err(Error::Config { message }) => Some(message),
            Err(e) => Some(e.to_string()),
        };
        Table { name, refused }
    }

    /// The name, or [`Error::Config`] if it is not an identifier.
    pub fn name(&self) -> Result<&str> {
        match &self.refused {
            None => Ok(&self.name),
            Some(message) => Err(Error::Config {
                message: message.clone(),
            }),
        }
    }

    /// The name as given, checked or not: for statements prepared ahead, which only run after
    /// [`name`](Self::name) said yes.
    pub fn as_given(&self) -> &str {
        &self.name
    }
}
