//! The frame every page shares, and how values from the database or
//! SpiceDB are shown: maud escapes HTML in every `(value)`; [`text`] also
//! makes control characters visible (`\u{1b}`), so a value can neither
//! inject markup nor hide part of itself.

use maud::{DOCTYPE, Markup, html};

use super::auth::{Access, CSRF_FIELD};
use crate::display;

/// A value shown whole (an id: every character matters), control
/// characters written as escapes.
pub fn text(value: &str) -> String {
    display::escape(value).into_owned()
}

/// A value shown on one bounded line (an error, a reason).
pub fn short(value: &str, max: usize) -> String {
    display::line(value, max)
}

/// Which section of the navigation is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Dead,
    Resource,
    Reconcile,
    Mappings,
    Login,
}

pub fn page(title: &str, here: Section, access: &Access, body: Markup) -> Markup {
    let link = |section: Section, href: &str, label: &str| {
        html! { a href=(href) class=[(section == here).then_some("here")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · authz-outbox" }
                link rel="stylesheet" href="/ui/assets/style.css";
                script src="/ui/assets/ui.js" defer {}
            }
            body {
                header {
                    span.brand { "authz-outbox" }
                    (link(Section::Overview, "/ui/", "Overview"))
                    (link(Section::Dead, "/ui/dead", "Dead rows"))
                    (link(Section::Resource, "/ui/resource", "Resource"))
                    (link(Section::Reconcile, "/ui/reconcile", "Reconcile"))
                    (link(Section::Mappings, "/ui/mappings", "Mappings"))
                    @match access {
                        Access::ReadOnly => span.muted { "read-only" },
                        Access::SignedOut => (link(Section::Login, "/ui/login", "Sign in")),
                        Access::SignedIn { .. } => form.inline method="post" action="/ui/logout" {
                            (csrf_field(access))
                            button type="submit" { "Sign out" }
                        },
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of an action form (nothing when signed out).
pub fn csrf_field(access: &Access) -> Markup {
    html! {
        @if let Some(csrf) = access.csrf() {
            input type="hidden" name=(CSRF_FIELD) value=(csrf);
        }
    }
}

/// Says why actions are not offered, where a form would be.
pub fn no_actions(access: &Access) -> Markup {
    html! {
        @match access {
            Access::ReadOnly => p.muted {
                "Read-only: actions are offered only by a worker started with AUTHZ_OUTBOX_UI_TOKEN."
            },
            Access::SignedOut => p.muted {
                a href="/ui/login" { "Sign in" } " with the UI token to act."
            },
            Access::SignedIn { .. } => {},
        }
    }
}

/// A minimal page for errors, without the navigation's state.
pub fn bare(title: &str, message: &str) -> Markup {
    page(
        title,
        Section::Overview,
        &Access::ReadOnly,
        html! { p.note.bad { (text(message)) } p { a href="/ui/" { "Back to the overview" } } },
    )
}

/// `12s`, `4m`, `3h`, `2d`: an age at a glance.
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A link to one resource's page, its parts percent-encoded.
pub fn resource_href(resource_type: &str, selector: &str) -> String {
    format!(
        "/ui/resource/{}/{}",
        url::form_urlencoded::byte_serialize(resource_type.as_bytes()).collect::<String>(),
        url::form_urlencoded::byte_serialize(selector.as_bytes()).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_render_as_text() {
        let hostile = "<script>alert(1)</script>\u{1b}[31m\u{0}";
        let out = html! { td { (text(hostile)) } }.into_string();
        assert!(!out.contains("<script>"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
        assert!(out.contains("\\u{1b}"), "{out}");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{0}'), "{out}");
    }

    #[test]
    fn links_encode_the_selector() {
        assert_eq!(
            resource_href("api_key", "a/b c?<"),
            "/ui/resource/api_key/a%2Fb+c%3F%3C"
        );
    }
}
