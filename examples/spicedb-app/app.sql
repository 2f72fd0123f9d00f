-- The example application's own tables: nothing authz-outbox specific.
CREATE TABLE IF NOT EXISTS folders (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    owner_id   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS documents (
    id         text PRIMARY KEY,
    folder_id  text NOT NULL REFERENCES folders (id),
    owner_id   text NOT NULL,
    title      text NOT NULL,
    deleted_at timestamptz,              -- deleted softly
    created_at timestamptz NOT NULL DEFAULT now()
);
