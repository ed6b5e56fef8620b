-- routex-schema.sql: the RouteX tables evictd's sample config watches, for the docker-compose demo
-- only. In a real deployment the Django app's migrations create them; skip this file there.
CREATE TABLE IF NOT EXISTS products (
    id serial PRIMARY KEY,
    name text NOT NULL,
    stock int NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS drivers (
    id serial PRIMARY KEY,
    user_id int NOT NULL,
    is_active bool NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS shipments (
    id serial PRIMARY KEY,
    product_id int REFERENCES products,
    driver_id int REFERENCES drivers,
    status text NOT NULL DEFAULT 'new'
);
