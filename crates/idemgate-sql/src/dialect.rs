//! What differs between the SQL databases idemgate writes to, beyond the claim statements.

/// A SQL database's spelling of the statements idemgate shares between backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// PostgreSQL: `$n` placeholders, `TEXT` keys, the server's clock.
    Postgres,
    /// MySQL and MariaDB: `?` placeholders, byte-wise `VARBINARY` keys, InnoDB, the server's
    /// clock.
    MySql,
    /// SQLite: `?n` placeholders, `WITHOUT ROWID` tables, the caller's clock.
    Sqlite,
}

impl Dialect {
    /// The backend's name in errors (`"postgres"`, `"mysql"`, `"sqlite"`).
    pub fn backend(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::MySql => "mysql",
            Dialect::Sqlite => "sqlite",
        }
    }

    /// `sql` with each `?` replaced by this dialect's placeholder (`$1`, `?`, `?1`, …).
    ///
    /// ```
    /// use idemgate_sql::Dialect;
    /// assert_eq!(Dialect::Postgres.sql("a = ? AND b = ?"), "a = $1 AND b = $2");
    /// assert_eq!(Dialect::Sqlite.sql("a = ?"), "a = ?1");
    /// assert_eq!(Dialect::MySql.sql("a = ?"), "a = ?");
    /// ```
    pub fn sql(self, sql: &str) -> String {
        let prefix = match self {
            Dialect::MySql => return sql.to_owned(),
            Dialect::Postgres => '$',
            Dialect::Sqlite => '?',
        };
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push(prefix);
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The column type of a key part (scope, id, stream, group, topic): compared byte for byte.
    pub fn key_type(self) -> &'static str {
        match self {
            Dialect::Postgres | Dialect::Sqlite => "TEXT",
            Dialect::MySql => "VARBINARY(255)",
        }
    }

    /// A 32-bit integer column.
    pub fn int_type(self) -> &'static str {
        match self {
            Dialect::Postgres | Dialect::Sqlite => "INTEGER",
            Dialect::MySql => "INT",
        }
    }

    /// A 64-bit integer column.
    pub fn bigint_type(self) -> &'static str {
        match self {
            Dialect::Postgres | Dialect::MySql => "BIGINT",
            Dialect::Sqlite => "INTEGER",
        }
    }

    /// A byte-string column.
    pub fn blob_type(self) -> &'static str {
        match self {
            Dialect::Postgres => "BYTEA",
            Dialect::MySql => "LONGBLOB",
            Dialect::Sqlite => "BLOB",
        }
    }

    /// What follows a `CREATE TABLE (…)` of a keyed table.
    pub fn table_options(self) -> &'static str {
        match self {
            Dialect::Postgres => "",
            Dialect::MySql => " ENGINE=InnoDB",
            Dialect::Sqlite => " WITHOUT ROWID",
        }
    }

    /// `INSERT` that skips a row whose key exists: `{insert_ignore} table (cols) VALUES (…)`
    /// followed by [`ignore_suffix`](Self::ignore_suffix).
    pub fn insert_ignore(self) -> &'static str {
        match self {
            Dialect::Postgres => "INSERT INTO",
            Dialect::MySql => "INSERT IGNORE INTO",
            Dialect::Sqlite => "INSERT OR IGNORE INTO",
        }
    }

    /// What ends an [`insert_ignore`](Self::insert_ignore) statement.
    pub fn ignore_suffix(self) -> &'static str {
        match self {
            Dialect::Postgres => " ON CONFLICT DO NOTHING",
            Dialect::MySql | Dialect::Sqlite => "",
        }
    }

    /// The database clock in milliseconds since the Unix epoch, as an SQL expression; `None`
    /// where the caller's clock is used (SQLite runs in the caller's process and tests move
    /// its clock by hand).
    pub fn now_ms(self) -> Option<&'static str> {
        match self {
            Dialect::Postgres => Some("(extract(epoch from now()) * 1000)::bigint"),
            Dialect::MySql => Some("CAST(ROUND(UNIX_TIMESTAMP(NOW(3)) * 1000) AS SIGNED)"),
            Dialect::Sqlite => None,
        }
    }

    /// An upsert of `rows` (`VALUES (…)` or a `SELECT`) into `table (key, value)` that leaves
    /// an existing row as it is but holds its write lock until the transaction ends.
    pub fn insert_or_lock(self, table: &str, key: &str, value: &str, rows: &str) -> String {
        match self {
            Dialect::Postgres | Dialect::Sqlite => format!(
                "INSERT INTO {table} ({key}, {value}) {rows} \
                 ON CONFLICT ({key}) DO UPDATE SET {value} = {table}.{value}"
            ),
            Dialect::MySql => format!(
                "INSERT INTO {table} ({key}, {value}) {rows} \
                 ON DUPLICATE KEY UPDATE {value} = {value}"
            ),
        }
    }

    /// Checks that `name` can be spliced into this dialect's SQL as a table name: a lowercase
    /// identifier of at most 48 bytes (PostgreSQL folds unquoted names to lowercase, and MySQL
    /// shares the rule), or for SQLite any identifier of at most 64.
    pub fn check_table(self, name: &str) -> idemgate_core::Result<()> {
        let (upper, max, rule) = match self {
            Dialect::Postgres | Dialect::MySql => (
                false,
                48,
                "a lowercase identifier ([a-z_][a-z0-9_]*, at most 48)",
            ),
            Dialect::Sqlite => (
                true,
                64,
                "an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64)",
            ),
        };
        let letter =
            |b: u8| b.is_ascii_lowercase() || (upper && b.is_ascii_uppercase()) || b == b'_';
        let ok = !name.is_empty()
            && name.len() <= max
            && name.bytes().next().is_some_and(letter)
            && name.bytes().all(|b| letter(b) || b.is_ascii_digit());
        if ok {
            Ok(())
        } else {
            Err(idemgate_core::Error::Config {
                message: format!("table name {name:?} must be {rule}"),
            })
        }
    }

    /// The columns of `table` in order, as a query with the table's name as its one parameter.
    pub(crate) fn columns_query(self) -> &'static str {
        match self {
            Dialect::Postgres => {
                "SELECT column_name::text FROM information_schema.columns
                  WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position"
            }
            Dialect::MySql => {
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns
                  WHERE table_schema = DATABASE() AND table_name = ? ORDER BY ordinal_position"
            }
            Dialect::Sqlite => "SELECT name FROM pragma_table_info(?1)",
        }
    }
}
