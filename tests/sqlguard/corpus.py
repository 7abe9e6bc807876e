"""Shared by the oracle tests and ``benchmarks/sqlguard.py``: schema, data and queries.

Three tenant tables (customers, orders, order_items) whose keys collide across tenants, one
shared table (countries), three tenants, and reporting queries of the kind a model writes.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

TENANTS = ("acme", "globex", "initech")
# A report of about 300 characters (the rewrite benchmark's reference query).
REPORT = (
    "SELECT c.name, sum(i.quantity * i.unit_price) AS spend FROM customers c "
    "JOIN orders o ON o.customer_id = c.id JOIN order_items i ON i.order_id = o.id "
    "WHERE o.status = 'paid' AND o.created_at >= DATE '2024-03-01' GROUP BY c.name "
    "HAVING sum(i.quantity) > 2 ORDER BY spend DESC, c.name LIMIT 10"
)
FIFTY_FIELDS = (
    "SELECT "
    + " || ' ' || ".join(
        ["name", "country", "coalesce(segment, '-')", "id::text", "created_at::text"] * 10
    )
    + " AS line FROM customers"
)
TENANT_TABLES = {"customers": "tenant_id", "orders": "tenant_id", "order_items": "tenant_id"}
SHARED_TABLES = ("countries",)

SCHEMA = (
    """CREATE TABLE countries (
        code text PRIMARY KEY, name text NOT NULL, region text NOT NULL)""",
    """CREATE TABLE customers (
        tenant_id text NOT NULL, id int NOT NULL, name text NOT NULL, country text NOT NULL,
        segment text, created_at date NOT NULL, PRIMARY KEY (tenant_id, id))""",
    """CREATE TABLE orders (
        tenant_id text NOT NULL, id int NOT NULL, customer_id int NOT NULL,
        status text NOT NULL, total numeric(10, 2) NOT NULL, created_at date NOT NULL,
        PRIMARY KEY (tenant_id, id))""",
    """CREATE TABLE order_items (
        tenant_id text NOT NULL, order_id int NOT NULL, line int NOT NULL,
        product text NOT NULL, quantity int NOT NULL, unit_price numeric(10, 2) NOT NULL,
        PRIMARY KEY (tenant_id, order_id, line))""",
    # every index starts with the tenant column, as the design asks of tenant tables
    "CREATE INDEX orders_customer ON orders (tenant_id, customer_id)",
)

COUNTRIES = (
    ("US", "United States", "americas"),
    ("BR", "Brazil", "americas"),
    ("DE", "Germany", "europe"),
    ("FR", "France", "europe"),
    ("GB", "United Kingdom", "europe"),
    ("JP", "Japan", "asia"),
)
_SEGMENTS = ("smb", "mid", "enterprise", None)
_STATUSES = ("paid", "paid", "paid", "pending", "refunded", "cancelled")
_PRODUCTS = ("widget", "gadget", "gizmo", "doohickey", "sprocket")
_NAMES = ("Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu")
_START = date(2024, 1, 1)

Row = tuple[object, ...]


def tenant_rows(tenant: str, scale: int = 1) -> dict[str, list[Row]]:
    """Deterministic rows of one tenant; ids start at 1 for every tenant, so keys collide."""
    rnd = random.Random(f"{tenant}-{scale}")
    n_customers = {"acme": 12, "globex": 9, "initech": 15}[tenant] * scale
    customers: list[Row] = []
    for i in range(1, n_customers + 1):
        name = f"{rnd.choice(_NAMES)} {tenant[:2].upper()}{i}"
        country = rnd.choice(COUNTRIES)[0] if i % 7 else "XX"  # XX: no such country
        customers.append(
            (
                tenant,
                i,
                name,
                country,
                rnd.choice(_SEGMENTS),
                _START + timedelta(rnd.randrange(300)),
            )
        )
    orders: list[Row] = []
    items: list[Row] = []
    order_id = 0
    for customer in customers:
        for _ in range(rnd.randrange(0, 6)):
            order_id += 1
            created = _START + timedelta(rnd.randrange(365))
            lines = rnd.randrange(1, 4)
            total = 0
            for line in range(1, lines + 1):
                qty = rnd.randrange(1, 10)
                price = rnd.randrange(100, 10_000)
                total += qty * price
                items.append((tenant, order_id, line, rnd.choice(_PRODUCTS), qty, price / 100))
            orders.append(
                (tenant, order_id, customer[1], rnd.choice(_STATUSES), total / 100, created)
            )
    return {"customers": customers, "orders": orders, "order_items": items}


QUERIES_1: tuple[str, ...] = (
    # plain reads and filters
    "SELECT * FROM customers",
    "SELECT id, name FROM customers WHERE country = 'DE'",
    "SELECT * FROM orders WHERE status = 'paid' AND total > 100",
    "SELECT id, total FROM orders WHERE total BETWEEN 50 AND 300",
    "SELECT name FROM customers WHERE name LIKE 'A%' OR name ILIKE '%o%'",
    "SELECT id FROM customers WHERE segment IS NULL",
    "SELECT id, segment FROM customers WHERE segment IS DISTINCT FROM 'smb'",
    "SELECT DISTINCT status FROM orders",
    "SELECT DISTINCT ON (customer_id) customer_id, id, total FROM orders "
    "ORDER BY customer_id, total DESC, id",
    "SELECT id, total FROM orders ORDER BY total DESC, id LIMIT 5",
    "SELECT id, total FROM orders ORDER BY id OFFSET 3 LIMIT 4",
    "SELECT id FROM orders ORDER BY id FETCH FIRST 3 ROWS ONLY",
    "SELECT o.id, o.total FROM orders AS o WHERE o.customer_id IN (1, 2, 3)",
    "SELECT count(*) FROM orders",
    "SELECT count(*) AS n, sum(total) AS revenue, avg(total) AS average FROM orders",
    "SELECT min(created_at), max(created_at) FROM orders WHERE status <> 'cancelled'",
    "SELECT * FROM orders WHERE created_at >= DATE '2024-06-01' AND created_at < '2024-07-01'",
    "SELECT id, total * 1.2 AS gross, round(total / 3, 2) AS third FROM orders",
    "SELECT upper(name), length(name), lower(country) FROM customers",
    "SELECT id, coalesce(segment, 'unknown') AS segment FROM customers",
    "SELECT id, nullif(segment, 'smb') FROM customers",
    "SELECT id, greatest(total, 100), least(total, 100) FROM orders",
    "SELECT id, CASE WHEN total > 500 THEN 'large' WHEN total > 100 THEN 'medium' "
    "ELSE 'small' END AS size FROM orders",
    "SELECT id, CASE status WHEN 'paid' THEN 1 ELSE 0 END AS is_paid FROM orders",
    "SELECT * FROM order_items WHERE product = 'widget' AND quantity >= 5",
    "SELECT order_id, sum(quantity * unit_price) FROM order_items GROUP BY order_id",
    "SELECT TABLE_NAME.id FROM customers AS table_name",
    "SELECT id FROM customers WHERE NOT (country = 'US' OR country = 'BR')",
    "SELECT id, created_at + 30 AS due FROM orders",
    "SELECT id, extract(month FROM created_at) AS m, date_part('dow', created_at) FROM orders",
    "SELECT date_trunc('month', created_at)::date AS month, count(*) FROM orders GROUP BY 1",
    "SELECT to_char(created_at, 'YYYY-MM') AS month, sum(total) FROM orders GROUP BY 1",
    "SELECT id, substring(name FROM 1 FOR 3), position('o' IN name) FROM customers",
    "SELECT id, trim(both ' ' FROM name), split_part(name, ' ', 1) FROM customers",
    "SELECT id, name || ' (' || country || ')' AS label FROM customers",
    "SELECT concat_ws('/', country, segment) FROM customers",
    "SELECT id, total::int AS whole, CAST(total AS text) FROM orders",
    "SELECT * FROM orders WHERE status IN ('pending', 'refunded')",
    "SELECT * FROM orders WHERE status NOT IN ('paid')",
    "SELECT id FROM customers WHERE name ~ '^[A-D]'",
    "SELECT * FROM countries ORDER BY code",
    "SELECT region, count(*) FROM countries GROUP BY region",
    # joins
    "SELECT c.name, o.id, o.total FROM orders o JOIN customers c ON c.id = o.customer_id",
    "SELECT c.name, o.total FROM customers c LEFT JOIN orders o ON o.customer_id = c.id",
    "SELECT c.id, o.id FROM orders o RIGHT JOIN customers c ON o.customer_id = c.id",
    "SELECT c.id, o.id FROM customers c FULL OUTER JOIN orders o ON o.customer_id = c.id",
    "SELECT c.name, k.name AS country FROM customers c JOIN countries k ON k.code = c.country",
    "SELECT c.name, k.region FROM customers c LEFT JOIN countries k ON k.code = c.country",
    "SELECT o.id, i.line, i.product FROM orders o JOIN order_items i ON i.order_id = o.id",
    "SELECT c.name, count(i.*) FROM customers c JOIN orders o ON o.customer_id = c.id "
    "JOIN order_items i ON i.order_id = o.id GROUP BY c.id, c.name",
    "SELECT c.id, o.id FROM customers c, orders o WHERE o.customer_id = c.id AND o.total > 200",
    "SELECT c.id, o.id FROM customers c CROSS JOIN orders o WHERE c.id = 1 AND o.id < 4",
    "SELECT * FROM orders JOIN customers ON customers.id = orders.customer_id",
    "SELECT * FROM orders o JOIN customers c USING (tenant_id) WHERE o.id = 1 AND c.id = 2",
    "SELECT a.id, b.id FROM customers a JOIN customers b ON a.country = b.country AND a.id < b.id",
    "SELECT x.a, x.b FROM customers AS x(t, a, b)",
    "SELECT * FROM customers c NATURAL JOIN countries k",
    # aggregates, GROUP BY, HAVING
    "SELECT customer_id, count(*), sum(total) FROM orders GROUP BY customer_id",
    "SELECT customer_id, sum(total) FROM orders GROUP BY customer_id HAVING sum(total) > 500",
    "SELECT status, count(*) FILTER (WHERE total > 100) AS big, count(*) FROM orders "
    "GROUP BY status",
    "SELECT c.country, count(DISTINCT o.customer_id) FROM customers c "
    "JOIN orders o ON o.customer_id = c.id GROUP BY c.country",
    "SELECT product, sum(quantity), avg(unit_price)::numeric(10, 2) FROM order_items "
    "GROUP BY product",
    "SELECT k.region, sum(o.total) FROM orders o JOIN customers c ON c.id = o.customer_id "
    "JOIN countries k ON k.code = c.country GROUP BY k.region",
    "SELECT segment, country, count(*) FROM customers GROUP BY ROLLUP (segment, country)",
    "SELECT segment, country, count(*) FROM customers GROUP BY CUBE (segment, country)",
    "SELECT segment, count(*) FROM customers GROUP BY GROUPING SETS ((segment), ())",
    "SELECT string_agg(name, ', ' ORDER BY id) FROM customers",
    "SELECT customer_id, array_agg(id ORDER BY id) FROM orders GROUP BY customer_id",
    "SELECT bool_and(total > 10), bool_or(status = 'refunded') FROM orders",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY total) FROM orders",
    "SELECT status, round(stddev_pop(total), 4) FROM orders GROUP BY status",
    "SELECT count(*) FROM orders HAVING count(*) > 0",
    "SELECT country, max(created_at) - min(created_at) AS span FROM customers GROUP BY country",
    # window functions
    "SELECT id, total, sum(total) OVER (ORDER BY id) AS running FROM orders",
    "SELECT id, customer_id, row_number() OVER (PARTITION BY customer_id ORDER BY id) FROM orders",
    "SELECT id, rank() OVER (ORDER BY total DESC, id) FROM orders",
    "SELECT id, total, lag(total) OVER w, lead(total) OVER w FROM orders WINDOW w AS (ORDER BY id)",
    "SELECT id, total, avg(total) OVER (PARTITION BY status) FROM orders",
    "SELECT id, first_value(id) OVER (PARTITION BY customer_id ORDER BY created_at, id) "
    "FROM orders",
    "SELECT id, ntile(4) OVER (ORDER BY id) FROM orders",
    "SELECT * FROM (SELECT id, customer_id, row_number() OVER (PARTITION BY customer_id "
    "ORDER BY total DESC, id) AS rn FROM orders) t WHERE rn = 1",
    "SELECT id, sum(total) OVER (ORDER BY id ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) FROM orders",
    # CTEs
    "WITH totals AS (SELECT customer_id, sum(total) AS t FROM orders GROUP BY customer_id) "
    "SELECT c.name, totals.t FROM totals JOIN customers c ON c.id = totals.customer_id",
    "WITH paid AS (SELECT * FROM orders WHERE status = 'paid'), "
    "big AS (SELECT * FROM paid WHERE total > 200) SELECT count(*) FROM big",
    "WITH orders AS (SELECT * FROM orders WHERE status = 'paid') SELECT count(*) FROM orders",
    "WITH c AS MATERIALIZED (SELECT id FROM customers) SELECT * FROM c",
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) "
    "SELECT n.i, count(o.id) FROM n LEFT JOIN orders o ON o.customer_id = n.i GROUP BY n.i",
    "WITH x AS (SELECT id FROM customers) SELECT * FROM x WHERE id IN "
    "(WITH y AS (SELECT customer_id FROM orders) SELECT customer_id FROM y)",
    "WITH monthly AS (SELECT date_trunc('month', created_at) AS m, sum(total) AS s "
    "FROM orders GROUP BY 1) SELECT m, s, s - lag(s) OVER (ORDER BY m) FROM monthly",
    "WITH customers AS (SELECT 1 AS id) SELECT (SELECT count(*) FROM customers), "
    "(SELECT count(*) FROM public.customers)",
    # set operations
    "SELECT customer_id FROM orders UNION SELECT id FROM customers",
    "SELECT customer_id FROM orders UNION ALL SELECT id FROM customers",
    "SELECT id FROM customers INTERSECT SELECT customer_id FROM orders",
    "SELECT id FROM customers EXCEPT SELECT customer_id FROM orders",
    "SELECT 'customer' AS kind, count(*) FROM customers UNION ALL "
    "SELECT 'order', count(*) FROM orders ORDER BY kind",
    "(SELECT id FROM orders ORDER BY id LIMIT 2) UNION (SELECT id FROM customers ORDER BY id "
    "LIMIT 2)",
    "TABLE countries",
    "SELECT * FROM customers UNION TABLE customers",
    # subqueries, EXISTS, IN
    "SELECT * FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id)",
    "SELECT * FROM customers c WHERE NOT EXISTS (SELECT 1 FROM orders o "
    "WHERE o.customer_id = c.id)",
    "SELECT * FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE total > 300)",
    "SELECT * FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)",
    "SELECT c.name, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) FROM customers c",
    "SELECT id, total, total - (SELECT avg(total) FROM orders) AS diff FROM orders",
    "SELECT * FROM orders WHERE total > ALL (SELECT total FROM orders WHERE status = 'pending')",
    "SELECT * FROM orders WHERE total >= ANY (SELECT total FROM orders WHERE status = 'refunded')",
    "SELECT * FROM (SELECT customer_id, sum(total) AS s FROM orders GROUP BY 1) t WHERE s > 100",
    "SELECT ARRAY(SELECT id FROM customers ORDER BY id)",
    "SELECT * FROM orders WHERE customer_id = (SELECT min(id) FROM customers)",
    "SELECT c.id FROM customers c WHERE c.country IN (SELECT code FROM countries "
    "WHERE region = 'europe')",
    # LATERAL
    "SELECT c.name, l.id, l.total FROM customers c, LATERAL (SELECT id, total FROM orders o "
    "WHERE o.customer_id = c.id ORDER BY total DESC, id LIMIT 2) l",
    "SELECT c.id, l.n FROM customers c LEFT JOIN LATERAL (SELECT count(*) AS n FROM orders o "
    "WHERE o.customer_id = c.id) l ON true",
    "SELECT o.id, s.i FROM orders o CROSS JOIN LATERAL generate_series(1, o.customer_id % 3) "
    "AS s(i)",
    # VALUES, misc
    "SELECT * FROM (VALUES ('paid', 1), ('pending', 2)) AS v(status, rank) "
    "JOIN orders o ON o.status = v.status",
    "VALUES (1, 'a'), (2, 'b')",
    "SELECT v.x, count(o.id) FROM (VALUES (1), (2), (3)) v(x) LEFT JOIN orders o "
    "ON o.customer_id = v.x GROUP BY v.x",
    "SELECT id, total FROM orders WHERE (customer_id, status) IN ((1, 'paid'), (2, 'paid'))",
    "SELECT u.x FROM unnest(ARRAY[1, 2, 3]) AS u(x) WHERE u.x IN (SELECT id FROM customers)",
    "SELECT id, jsonb_build_object('id', id, 'total', total) FROM orders",
    "SELECT id FROM public.orders WHERE orders.total > 0 OR true",
    "SELECT o.* FROM orders o WHERE o.created_at > (SELECT max(created_at) FROM orders) - 60",
    "SELECT c.id, c.name FROM customers c WHERE c.segment = 'enterprise' AND c.country <> 'US' "
    "ORDER BY c.name, c.id",
    "SELECT count(*) FILTER (WHERE status = 'paid')::float / count(*) AS paid_ratio FROM orders",
    "SELECT id, age(DATE '2025-01-01', created_at) FROM orders",
    "SELECT id, abs(total - 100), ceil(total), floor(total), sign(total - 250) FROM orders",
    "SELECT id, lpad(id::text, 5, '0'), replace(name, ' ', '_') FROM customers",
    "SELECT product, sum(quantity) AS q FROM order_items i JOIN orders o ON o.id = i.order_id "
    "WHERE o.status = 'paid' GROUP BY product HAVING sum(quantity) > 3 ORDER BY q DESC, product",
)

BENIGN: tuple[str, ...] = (
    # shapes the first guard refused: date(), LIKE ... ESCAPE, SIMILAR TO, row_to_json, JSON keys,
    # full-text search, long || lines, field selection, literals holding placeholder look-alikes
    "SELECT id, date(created_at + interval '1 day') AS due FROM orders",
    "SELECT name FROM customers WHERE name LIKE 'A!%%' ESCAPE '!' OR name LIKE '%o%' ESCAPE '#'",
    "SELECT name FROM customers WHERE name SIMILAR TO '(A|B|C)%'",
    "SELECT name FROM customers WHERE name NOT SIMILAR TO '%(y|u)%' ESCAPE '#'",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT to_jsonb(o) - 'tenant_id' FROM orders o",
    "SELECT DISTINCT jsonb_object_keys(jsonb_build_object('id', id, 'total', total)) FROM orders",
    "SELECT k, count(*) FROM orders o, jsonb_object_keys(to_jsonb(o)) AS k GROUP BY k",
    "SELECT id, to_tsvector('english', name) @@ plainto_tsquery('english', 'ada') FROM customers",
    "SELECT name, ts_rank(to_tsvector('simple', name), to_tsquery('simple', 'ada | bo')) AS r "
    "FROM customers ORDER BY r DESC, id",
    "SELECT id FROM customers WHERE to_tsvector('simple', name) @@ "
    "websearch_to_tsquery('simple', 'ada or \"flo\"')",
    "SELECT count(*) FROM customers WHERE to_tsvector(name) @@ phraseto_tsquery('ada')",
    FIFTY_FIELDS,
    "SELECT (o).id, (o).total FROM orders o WHERE (o).status = 'paid'",
    "SELECT o.*, (c).name FROM orders o JOIN customers c ON c.id = o.customer_id",
    "WITH t AS (SELECT id, total FROM orders) SELECT t.id, (t).total FROM t",
    "SELECT customer_id, count(*) FROM orders JOIN customers ON customers.id = orders.customer_id "
    "GROUP BY customer_id",
    "SELECT o.id, x.n FROM orders o JOIN LATERAL (SELECT count(*) AS n FROM order_items i "
    "WHERE i.order_id = o.id) x ON true",
    "SELECT u.value, u.ordinality FROM jsonb_array_elements('[1, 2, 3]'::jsonb) WITH ORDINALITY u",
    "SELECT e.key, e.value FROM orders o, jsonb_each(jsonb_build_object('id', o.id)) e",
    "SELECT format('%s-%s', country, id) FROM customers",
    "SELECT to_char(created_at, 'YYYY-MM-DD HH24:MI') FROM orders",
    "SELECT '%(tenant_id)s' AS a, '$1' AS b, ':tenant_id' AS c, '?' AS d, count(*) FROM orders",
    "SELECT $$%(tenant_id)s$$ AS a, E'\\x25 :tenant_id' AS b, U&'\\0025' AS c FROM orders",
    'SELECT "Revenue %" FROM (SELECT sum(total) AS "Revenue %" FROM orders) s',
    "SELECT id -- :tenant_id %(tenant_id)s\n FROM orders /* $1 ? */",
    "SELECT v.column1, v.column2 FROM (VALUES (1, 'a'), (2, 'b')) v",
    "SELECT id FROM orders UNION SELECT id FROM customers ORDER BY id",
    "SELECT s.id FROM (SELECT id FROM orders UNION ALL SELECT id FROM customers) s",
    "SELECT extract(year FROM created_at) AS y, count(*) FROM orders GROUP BY y ORDER BY y",
    "SELECT count(*) FILTER (WHERE name ~* '^a') FROM customers",
    "SELECT array_agg(DISTINCT country ORDER BY country) FROM customers",
    "SELECT json_agg(json_build_object('id', id) ORDER BY id) FROM orders",
    "SELECT g.g, count(o.id) FROM generate_series(1, 12) g LEFT JOIN orders o "
    "ON extract(month FROM o.created_at) = g.g GROUP BY g.g ORDER BY g.g",
    "SELECT date_trunc('week', created_at)::date AS w, round(avg(total), 2) FROM orders "
    "GROUP BY 1 ORDER BY 1",
    "SELECT o.id, c.name, tenant_id FROM orders o JOIN customers c USING (tenant_id) "
    "WHERE c.id = o.customer_id",
    "SELECT x.id, x.total FROM orders AS x(t, id) WHERE x.total > 100",
    "SELECT j.customer_id, l.n FROM (orders o JOIN customers c ON c.id = o.customer_id) "
    "AS j(a, b, customer_id) CROSS JOIN LATERAL (SELECT 1 AS n) l",
    "SELECT c.name, count(*) FROM customers c NATURAL JOIN (SELECT tenant_id, customer_id AS id "
    "FROM orders) o GROUP BY c.name",
    "SELECT n, o.id FROM orders o, generate_series(1, 2) AS n WHERE o.id < 3",
    "SELECT id, lower(name)::text, length(name::varchar(5)), total::numeric(10, 1) "
    "FROM customers JOIN orders USING (id)",
    "SELECT '2024-01-31'::date + interval '1 month', DATE '2024-02-01',"
    " timestamp '2024-01-01 10:00'",
    "WITH RECURSIVE d(day) AS (SELECT DATE '2024-01-01' UNION ALL SELECT day + 1 FROM d "
    "WHERE day < DATE '2024-01-10') SELECT d.day, count(o.id) FROM d LEFT JOIN orders o "
    "ON o.created_at = d.day GROUP BY d.day ORDER BY d.day",
    REPORT,
)

QUERIES: tuple[str, ...] = QUERIES_1 + BENIGN
