import redis
import json
import time

r = redis.Redis(host='localhost', port=6379, decode_responses=True)
TOPIC = "orders"

def create_order(order_id, user_email):
    order = {"id": order_id, "email": user_email, "total": 100}
    
    # 1. Save to DB (Mock)
    print(f"💾 Order #{order_id} saved to DB.")
    
    # 2. Publish Event
    r.publish(TOPIC, json.dumps(order))
    print(f"📢 Event published to '{TOPIC}'")

if __name__ == "__main__":
    # Simulate traffic
    create_order(101, "alice@example.com")
    time.sleep(1)
    create_order(102, "bob@example.com")
