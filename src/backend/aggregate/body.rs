//! A call's request body: the client's body as it came, or a JSON document whose string
//! leaves are templates.

use serde_json::{Map, Value};

use super::template::{self, Encoding, Missing, Scope, Template};

/// A call's request body: the client's, or JSON whose string leaves are templates (a leaf
/// that is one whole `{…}` takes the value's JSON type).
pub(crate) enum BodyTemplate {
    Client,
    Json(JsonTemplate),
}

pub(crate) enum JsonTemplate {
    Whole(template::Var),
    Text(Template),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
    Other(Value),
}

impl JsonTemplate {
    pub(super) fn render(&self, scope: &Scope<'_>) -> Result<Value, Missing> {
        Ok(match self {
            JsonTemplate::Whole(v) => scope.value(v)?,
            JsonTemplate::Text(t) => Value::String(t.render(scope, Encoding::Text)?),
            JsonTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.render(scope))
                    .collect::<Result<_, _>>()?,
            ),
            JsonTemplate::Object(fields) => {
                let mut m = Map::new();
                for (k, v) in fields {
                    m.insert(k.clone(), v.render(scope)?);
                }
                Value::Object(m)
            }
            JsonTemplate::Other(v) => v.clone(),
        })
    }
}
